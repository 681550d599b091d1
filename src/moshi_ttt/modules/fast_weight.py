"""What every fast-weight layer of moshi-ttt offers, whatever its method.

The conversion, checkpoints, training modes, evaluation and diagnostics talk to layers
through this surface only, so a method is one module package (`modules/<method>/`):

- `method`: its name in `TTTConfig.method`;
- `own_parameters`: prefixes, inside the layer, of the parameters the method adds to
  Moshi's (what `ttt.safetensors` holds and what `mode: ttt` trains); "" for all of them;
- `ttt_enabled`: False runs the same weights without test-time training, a diagnostic;
- `frames_per_update`: frames between two updates of the fast weights;
- `fast_weight_change_norms()`: [B] how far each sample's fast weights have moved,
  read from the streaming state (fast weights never live in parameters);
- `capture`: when set to a list, whole-sequence forwards append the method's
  diagnostics of each document.
"""

import torch


class FastWeightLayer:
    """Mixin of the fast-weight layers (before `StreamingModule` in the bases)."""

    method: str
    own_parameters: tuple[str, ...]
    ttt_enabled: bool
    capture: list | None

    @property
    def ttt_active(self) -> bool:
        raise NotImplementedError

    @property
    def frames_per_update(self) -> int:
        raise NotImplementedError

    def fast_weight_change_norms(self) -> torch.Tensor:
        raise NotImplementedError

    def own_parameter_names(self) -> list[str]:
        """The names (inside the layer) of the parameters the method adds."""
        return [name for name, _ in self.named_parameters()  # type: ignore[attr-defined]
                if any(name.startswith(prefix) for prefix in self.own_parameters)]


def document_spans(segments: torch.Tensor | None, length: int) -> list[list[tuple[int, int]]]:
    """[(start, end), ...] of the runs of equal document ids in each row (one span without ids)."""
    if segments is None:
        return [[(0, length)]]
    change = (segments[:, 1:] != segments[:, :-1]).cpu()
    spans = []
    for row in change:
        cuts = [0, *(row.nonzero().flatten() + 1).tolist(), length]
        spans.append(list(zip(cuts[:-1], cuts[1:])))
    return spans


def common_position(pos: torch.Tensor) -> int | None:
    """The position in the update period (chunk, mini-batch) shared by all samples, or None
    (also under CUDA-graph capture, where a step must not read values from the device)."""
    if pos.is_cuda and torch.cuda.is_current_stream_capturing():
        return None
    positions = pos.unique()
    return int(positions[0]) if positions.numel() == 1 else None


def check_sequence(x: torch.Tensor, segments: torch.Tensor | None, streaming: bool) -> None:
    """A non-empty sequence, and document ids (whole sequences only) of its shape."""
    if x.shape[1] == 0:
        raise ValueError("empty sequence: x has 0 time steps")
    if segments is not None:
        if segments.shape != x.shape[:2]:
            raise ValueError(f"segments has shape {tuple(segments.shape)}: expected {tuple(x.shape[:2])}")
        if streaming:
            raise ValueError("segments are for whole sequences; in streaming, use reset_streaming(mask)")


def check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}: expected an integer >= 1")
