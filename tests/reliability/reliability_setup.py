"""Constants shared by the reliability tests and their fixtures (conftest modules are not importable
by name when several exist)."""

TOKENS = "admin-token-0123456789abcdef0123456789=admin,gen-token-0123456789abcdef0123456789=generate"
LOOKS = [f"look{i}" for i in range(4)]
CHEAP_LIMITS = {"max_steps": 2, "default_steps": 1, "max_size": 32, "max_num_images": 2, "max_prompt_chars": 200}
