"""Process-free OpenAI serving pieces: schemas, SSE, errors, detokenizing, stops, reasoning."""
