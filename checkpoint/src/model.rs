//! Model folders (`save_pretrained` / `from_pretrained`). PLACEHOLDER: being implemented.
