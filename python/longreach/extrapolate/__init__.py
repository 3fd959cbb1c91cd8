"""The train-short, test-long study behind `python -m longreach extrapolate`.

data.py     byte-level corpus (the stdlib's own sources by default), split, batches, eval chunks
schemes.py  the compared schemes as configurations of one model, with their papers' claims
model.py    builds the model for a scheme and sets its eval-time RoPE scaling
train.py    training and evaluation loops (bits per byte)
finetune.py the opt-in fine-tuning schemes (rope's weights, PI, full or S2-Attn chunks)
report.py   checks against the papers, table, CSV, Markdown, plot
cli.py      the command line
"""

from .cli import main

__all__ = ["main"]
