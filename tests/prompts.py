"""Prompts for the equivalence tests: English, Chinese, code, emoji, mixed scripts, and chat conversations."""
from __future__ import annotations

PROMPTS: list[str] = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):\n    ",
    "import numpy as np\n\n# compute the mean of a list\n",
    "SELECT name, COUNT(*) FROM users",
    "请用一句话介绍北京。",
    "中文和English混合的句子：今天天气",
    "日本語のテキスト：東京は",
    "Emoji story: 🐱🐶🎉 and then",
    "🚀🌕 The rocket",
    "Привет! Как дела?",
    "The quick brown fox",
    "1, 1, 2, 3, 5, 8,",
    "<html><body><h1>",
    "A list of fruits:\n- apple\n-",
    "Translate to German: Good morning",
    "Q: What is 2 + 2?\nA:",
    "🙂",
    "Ünïcödé àccents: café, naïve,",
    "x",
]

CHATS: list[list[tuple[str, str]]] = [
    [("user", "What is the capital of France?")],
    [("system", "You are a terse assistant."), ("user", "Name three colours.")],
    [("user", "Hi!"), ("assistant", "Hello! How can I help?"), ("user", "写一首关于月亮的短诗")],
    [("user", "Give me an emoji that means happy 😀")],
]
