"""Datasets and tokenizers for nanoMiniMax (a plain folder; this file only makes `import data.tokenizers` find
this folder rather than some installed package called `data`).

    data/tokenizers.py        the three tiktoken tokenizers + writing/reading the token files
    data/stdlib/prepare.py    default dataset: this Python's own standard-library source (offline)
    data/shakespeare/prepare.py   Tiny Shakespeare (downloaded when you run it)
    data/text/prepare.py      any text file or folder of your own
"""
