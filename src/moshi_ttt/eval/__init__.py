"""`moshi-ttt eval`: recall of facts, loss against position, spoken-LM benchmarks, TTT diagnostics,
a report.

The names below load on first use, so that `moshi-ttt eval --help` answers without torch.
"""

from ..utils.lazy import lazy_names

_FROM_MODULE = {
    **{name: ".benchmarks" for name in ("audio_log_likelihoods", "score_pairs", "storycloze_pairs",
                                        "zerospeech_pairs")},
    "ttt_diagnostics": ".diagnostics", "evaluate_documents": ".long_context", "position_losses": ".teacher_forcing",
    **{name: ".recall" for name in ("answer_questions", "summarize", "synthetic_recall_set")},
}
__all__ = sorted(_FROM_MODULE)

__getattr__ = lazy_names(__name__, _FROM_MODULE)
