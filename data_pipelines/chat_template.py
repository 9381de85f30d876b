"""The one chat template: reserved marker tokens shared by the tokenizer, training and serving.

The markers are SentencePiece user-defined symbols, so each is always exactly one token.
"""

SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
CONTEXT = "<|context|>"  # extra context attached to a turn (retrieved text, tool output)
END = "<|end|>"  # end of a turn

MARKERS = (SYSTEM, USER, ASSISTANT, CONTEXT, END)
