"""`moshi-ttt eval`: recall of facts, loss against position, spoken-LM benchmarks, TTT diagnostics,
a report."""

from .benchmarks import audio_log_likelihoods, score_pairs, storycloze_pairs, zerospeech_pairs
from .diagnostics import ttt_diagnostics
from .long_context import evaluate_documents
from .recall import answer_questions, summarize, synthetic_recall_set
from .teacher_forcing import position_losses

__all__ = ["answer_questions", "audio_log_likelihoods", "evaluate_documents", "position_losses", "score_pairs",
           "storycloze_pairs", "summarize", "synthetic_recall_set", "ttt_diagnostics", "zerospeech_pairs"]
