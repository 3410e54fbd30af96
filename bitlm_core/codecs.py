"""Building blocks shared by bit-stream codecs (``rle``, ``pack`` and codecs of your own).

Input handling (bit tensors or ragged batches of them, validated fast), the decompression-bomb
guard (``max_bits``), conversion back to the caller's dtype, and :class:`StreamCodec`, the
class a spec's ``compression`` slot builds around a codec's module-level functions. Importing
this module does not import torch.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, NoReturn, Sequence

import numpy as np

from bitlm_core.bits import check_bits
from bitlm_core.errors import CodecError

DEFAULT_MAX_BITS = 1 << 30  # 1 G bits: 1 GiB of uint8 output
_HARD_LIMIT = 1 << 62  # keeps every sum of lengths inside int64


def as_bit_array(bits: Any, name: str = "bits", check: bool = True) -> tuple[np.ndarray, bool]:
    """A torch/numpy bit tensor -> (uint8 numpy view or copy, whether it was bool).

    Bool inputs are viewed as uint8 without a copy (they can only hold 0 and 1); uint8 inputs
    are checked with one numpy ``max`` (much faster than a torch reduction), and anything else
    goes to :func:`bitlm_core.bits.check_bits`, which raises ``BitsError`` saying what is wrong.

    ``check=False`` skips the ``max`` over uint8 input: the caller then owes every value a check
    and calls :func:`reject_bits` when one is not 0 or 1 (``pack`` checks large inputs on a
    second core while it packs them).
    """
    import torch

    if isinstance(bits, torch.Tensor) and bits.dtype == torch.bool:
        return bits.detach().cpu().contiguous().view(torch.uint8).numpy(), True
    if isinstance(bits, np.ndarray) and bits.dtype == np.bool_:
        return np.ascontiguousarray(bits).view(np.uint8), True
    if isinstance(bits, torch.Tensor) and bits.dtype == torch.uint8:
        arr = bits.detach().cpu().contiguous().numpy()
    elif isinstance(bits, np.ndarray) and bits.dtype == np.uint8:
        arr = np.ascontiguousarray(bits)
    else:
        arr = None
    if arr is not None and (not check or arr.size == 0 or int(arr.max()) <= 1):
        return arr, False
    reject_bits(bits, name)


def reject_bits(bits: Any, name: str = "bits") -> NoReturn:
    """Raise the error that says why ``bits`` is not a bit tensor (``BitsError``, naming it)."""
    check_bits(bits, name)  # raises BitsError naming the problem
    raise CodecError(f"{name} is not a bit tensor")  # unreachable for tensors check_bits accepts


def one_row(bits: Any, codec: str, check: bool = True) -> tuple[np.ndarray, bool]:
    """A single 1-D bit sequence, or a CodecError pointing to ``compress_batch``."""
    arr, is_bool = as_bit_array(bits, check=check)
    if arr.ndim != 1:
        raise CodecError(f"{codec}.compress takes one sequence of shape (L,), got shape "
                         f"{tuple(arr.shape)}; use compress_batch for several sequences")
    return arr, is_bool


def ragged_rows(seqs: Any) -> tuple[np.ndarray, np.ndarray, bool]:
    """A 2-D tensor or a list of 1-D tensors -> (concatenated bits, int64 row lengths, is_bool)."""
    if isinstance(seqs, (list, tuple)):
        arrays = [as_bit_array(s, f"seqs[{i}]") for i, s in enumerate(seqs)]
        for i, (arr, _) in enumerate(arrays):
            if arr.ndim != 1:
                raise CodecError(f"compress_batch: seqs[{i}] has shape {tuple(arr.shape)}; "
                                 "every sequence must be 1-D")
        kinds = {is_bool for _, is_bool in arrays}
        if len(kinds) > 1:
            raise CodecError("compress_batch: sequences mix torch.bool and torch.uint8; "
                             "convert them to one dtype first")
        lengths = np.array([arr.size for arr, _ in arrays], dtype=np.int64)
        cat = (np.concatenate([arr for arr, _ in arrays]) if arrays
               else np.empty(0, dtype=np.uint8))
        return cat, lengths, bool(kinds and kinds.pop())
    arr, is_bool = as_bit_array(seqs, "seqs")
    if arr.ndim != 2:
        raise CodecError(f"compress_batch takes a list of 1-D tensors or a 2-D tensor, got "
                         f"shape {tuple(arr.shape)}")
    return arr.reshape(-1), np.full(arr.shape[0], arr.shape[1], dtype=np.int64), is_bool


def check_limit(max_bits: Any) -> int:
    """A caller's ``max_bits`` as an int, or a CodecError when it is not a non-negative int."""
    if isinstance(max_bits, bool) or not isinstance(max_bits, (int, np.integer)) or max_bits < 0:
        raise CodecError(f"max_bits must be a non-negative int, got {max_bits!r}")
    return min(int(max_bits), _HARD_LIMIT)


def checked_total(lengths: np.ndarray, max_bits: int, codec: str) -> int:
    """Sum of declared row lengths, refusing (without overflow) anything over ``max_bits``.

    Call it before allocating any output: this is the decompression-bomb guard.
    """
    if lengths.size == 0:
        return 0
    declared = float(lengths.sum(dtype=np.float64))
    if int(lengths.max()) > max_bits or declared > max_bits + 1.0:
        raise CodecError(f"{codec} stream declares {declared:.0f} bits, over the limit "
                         f"max_bits={max_bits}; raise max_bits if the stream is trusted")
    total = int(lengths.sum())
    if total > max_bits:
        raise CodecError(f"{codec} stream declares {total} bits, over the limit max_bits="
                         f"{max_bits}; raise max_bits if the stream is trusted")
    return total


def to_tensor(arr: np.ndarray, is_bool: bool):
    """Decoded uint8 bits -> a torch tensor of the dtype the stream says the input had."""
    import torch

    t = torch.from_numpy(arr)
    return t.view(torch.bool) if is_bool else t


class StreamCodec:
    """A codec object over module-level functions, with the options a spec can set.

    Subclasses set ``name``, ``magic`` (the bytes every stream starts with) and the five
    functions as static methods (``encode(bits, checksum)``, ``decode(data, max_bits)``,
    ``encode_batch(seqs, checksum)``, ``decode_batch(data, max_bits)``,
    ``measure(bits, checksum)``).

    Options (bound from a run spec's ``compression.options``):

    ``max_bits``
        default decompression limit (total bits a stream may declare); each ``decompress``
        call can override it.
    ``checksum``
        end every stream with a checksum (default; CRC-32 for ``rle``, CRC-32C for ``pack``).
        Decoding follows the stream's own flag, so streams written either way decode with any
        instance.
    """

    name: ClassVar[str]
    magic: ClassVar[bytes]  # first bytes of every stream; `bitlm codec decompress` reads them
    encode: ClassVar[Callable[..., bytes]]
    decode: ClassVar[Callable[..., Any]]
    encode_batch: ClassVar[Callable[..., bytes]]
    decode_batch: ClassVar[Callable[..., list]]
    measure: ClassVar[Callable[..., dict]]

    def __init__(self, max_bits: int = DEFAULT_MAX_BITS, checksum: bool = True):
        self.max_bits = check_limit(max_bits)
        self.checksum = bool(checksum)

    def compress(self, bits: Any) -> bytes:
        return self.encode(bits, self.checksum)

    def decompress(self, data: bytes, max_bits: int | None = None):
        return self.decode(data, self.max_bits if max_bits is None else max_bits)

    def compress_batch(self, seqs: Sequence[Any] | Any) -> bytes:
        return self.encode_batch(seqs, self.checksum)

    def decompress_batch(self, data: bytes, max_bits: int | None = None) -> list:
        return self.decode_batch(data, self.max_bits if max_bits is None else max_bits)

    def stats(self, bits: Any) -> dict[str, Any]:
        return self.measure(bits, self.checksum)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(max_bits={self.max_bits}, checksum={self.checksum})"
