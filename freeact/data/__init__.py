from .text import chunks, mask_tokens, random_windows, read_text, text_path, token_stream

__all__ = ["chunks", "mask_tokens", "random_windows", "read_text", "text_path", "token_stream"]
