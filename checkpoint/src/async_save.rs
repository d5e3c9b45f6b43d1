//! Saving in the background. PLACEHOLDER: being implemented.
