//! `trainer_state.json`. PLACEHOLDER: being implemented.
