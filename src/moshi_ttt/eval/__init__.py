"""`moshi-ttt eval`: recall of facts, loss against position, spoken-LM benchmarks, TTT diagnostics,
a report.

The names below load on first use, so that `moshi-ttt eval --help` answers without torch.
"""

import importlib
import typing as tp

_FROM_MODULE = {
    **{name: ".benchmarks" for name in ("audio_log_likelihoods", "score_pairs", "storycloze_pairs",
                                        "zerospeech_pairs")},
    "ttt_diagnostics": ".diagnostics", "evaluate_documents": ".long_context", "position_losses": ".teacher_forcing",
    **{name: ".recall" for name in ("answer_questions", "summarize", "synthetic_recall_set")},
}
__all__ = sorted(_FROM_MODULE)


def __getattr__(name: str) -> tp.Any:
    if name in _FROM_MODULE:
        return getattr(importlib.import_module(_FROM_MODULE[name], __name__), name)
    raise AttributeError(f"module 'moshi_ttt.eval' has no attribute {name!r}")
