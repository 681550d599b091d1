"""Documents to train and evaluate on: synthetic recall, code files, moshi-finetune data, audio to codes."""

from ..utils.lazy import lazy_names

_FROM_MODULE = {
    "read_audio": ".audio",
    **{name: ".code_files" for name in ("CodeFiles", "audio_files", "tokenize_command", "write_codes")},
    **{name: ".finetune_data" for name in ("FinetuneConversations", "text_stream")},
    **{name: ".synthetic" for name in ("Fact", "SyntheticDocuments")},
    "AudioTokenizer": ".tokenize",
}
__all__ = sorted(_FROM_MODULE)

__getattr__ = lazy_names(__name__, _FROM_MODULE)
