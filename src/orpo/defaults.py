"""The defaults of the ORPO options, in one place that imports nothing: ``ORPOConfig`` (:mod:`orpo.config`),
the data pipeline and the command line (which must answer ``--help`` without importing torch) all read them
from here."""

ALPHA = 0.1  # orpo_alpha, the paper's λ
BETA = 1.0  # orpo_beta, the temperature on the log odds ratio (1.0 = the paper)
MAX_LENGTH = 1024  # prompt + response tokens
MAX_PROMPT_LENGTH = 512  # prompt tokens (keeps the end)
FORMATS = ("standard", "conversational", "implicit")  # data formats; "auto" detects one
DEMO = "demo"  # the embedded tiny model and tokenizer (orpo.demo); data: demo:train / demo:test
