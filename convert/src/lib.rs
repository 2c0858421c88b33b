//! Hugging Face safetensors <-> GGUF conversion (filled by the converter issue).
