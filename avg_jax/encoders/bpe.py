"""CLIP's byte-level BPE text tokenizer, read from a Hugging Face directory (vocab.json +
merges.txt), with no dependency beyond the standard library.

Text cleanup follows HF `CLIPTokenizer` as it runs without ftfy: drop control characters,
turn whitespace into spaces, space out CJK ideographs, NFC-normalise, lower-case, collapse
whitespace. Words are then split like CLIP's regex
`<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+`
(implemented with unicodedata, since the stdlib `re` lacks `\\p{..}`), each word is mapped to
byte-level symbols, the last one marked `</w>`, and merged by rank.
"""

import functools
import json
import os
import unicodedata
from collections.abc import Iterable, Sequence

import numpy as np

from avg_jax.errors import UserError

START = "<|startoftext|>"
END = "<|endoftext|>"
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")  # regex alternation order
# CLIP keeps at most this many merges (the first line of merges.txt is a header).
_MAX_MERGES = 49152 - 256 - 2


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible byte -> printable character table (spaces/controls moved past 255)."""
  printable = (
    list(range(ord("!"), ord("~") + 1))
    + list(range(ord("¡"), ord("¬") + 1))
    + list(range(ord("®"), ord("ÿ") + 1))
  )
  table, extra = {}, 0
  for b in range(256):
    if b in printable:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + extra)
      extra += 1
  return table


def _is_control(ch: str) -> bool:
  if ch in "\t\n\r":
    return False
  return unicodedata.category(ch).startswith("C")


def _is_whitespace(ch: str) -> bool:
  return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"


def _is_cjk(cp: int) -> bool:
  return (
    0x4E00 <= cp <= 0x9FFF
    or 0x3400 <= cp <= 0x4DBF
    or 0x20000 <= cp <= 0x2A6DF
    or 0x2A700 <= cp <= 0x2B73F
    or 0x2B740 <= cp <= 0x2B81F
    or 0x2B820 <= cp <= 0x2CEAF
    or 0xF900 <= cp <= 0xFAFF
    or 0x2F800 <= cp <= 0x2FA1F
  )


def clean_text(text: str) -> str:
  """Control characters removed, CJK spaced out, NFC, lower-case, single spaces."""
  out = []
  for ch in text:
    cp = ord(ch)
    if cp == 0 or cp == 0xFFFD or _is_control(ch):
      continue
    if _is_whitespace(ch):
      out.append(" ")
    elif _is_cjk(cp):
      out.append(f" {ch} ")
    else:
      out.append(ch)
  text = unicodedata.normalize("NFC", "".join(out))
  return " ".join(word.lower() for word in text.split())


def _is_letter(ch: str) -> bool:
  return unicodedata.category(ch).startswith("L")


def _is_number(ch: str) -> bool:
  return unicodedata.category(ch).startswith("N")


def split_words(text: str) -> list[str]:
  """CLIP's pre-tokenisation regex, as a scanner over already-cleaned text."""
  words, i, n = [], 0, len(text)
  while i < n:
    ch = text[i]
    if ch.isspace():
      i += 1
      continue
    special = next((s for s in (START, END) if text.startswith(s, i)), None)
    if special:
      words.append(special)
      i += len(special)
      continue
    contraction = next((c for c in _CONTRACTIONS if text.startswith(c, i)), None)
    if contraction:
      words.append(contraction)
      i += len(contraction)
      continue
    j = i + 1
    if _is_letter(ch):
      while j < n and _is_letter(text[j]):
        j += 1
    elif not _is_number(ch):  # a run of symbols: neither space, letter nor number
      while j < n and not (text[j].isspace() or _is_letter(text[j]) or _is_number(text[j])):
        j += 1
    words.append(text[i:j])
    i = j
  return words


class ClipBpeTokenizer:
  """`encode_batch(texts, max_length) -> int32[B, max_length]`: <|startoftext|> ids
  <|endoftext|>, truncated to keep both markers, padded with `pad_id` (like HF with
  `padding="max_length", truncation=True`)."""

  def __init__(
    self, vocab: dict[str, int], merges: Sequence[tuple[str, str]], pad_token: str = END
  ):
    self.vocab = dict(vocab)
    self.inverse = {i: t for t, i in self.vocab.items()}
    self.ranks = {pair: r for r, pair in enumerate(merges)}
    for token in (START, END, pad_token):
      if token not in self.vocab:
        raise UserError(f"CLIP vocab.json has no {token!r} token")
    self.bos_id, self.eos_id = self.vocab[START], self.vocab[END]
    self.pad_id = self.vocab[pad_token]
    self.unk_id = self.eos_id  # HF CLIPTokenizer's unknown token is <|endoftext|>
    self._byte_table = bytes_to_unicode()
    self._byte_inverse = {c: b for b, c in self._byte_table.items()}
    self._cache: dict[str, list[str]] = {START: [START], END: [END]}

  @classmethod
  def load(cls, path: str) -> "ClipBpeTokenizer":
    """Reads `vocab.json`, `merges.txt` and, when present, the pad token of
    `tokenizer_config.json`."""
    vocab_file, merges_file = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
    for file in (vocab_file, merges_file):
      if not os.path.exists(file):
        raise UserError(f"CLIP tokenizer file not found: {file}")
    try:
      with open(vocab_file, encoding="utf-8") as f:
        vocab = json.load(f)
      with open(merges_file, encoding="utf-8") as f:
        lines = f.read().strip().split("\n")
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
      raise UserError(f"CLIP tokenizer in {path}: cannot read: {e}") from e
    # Like CLIP and HF: the first line is the "#version" header; later lines are "a b" pairs.
    merges = []
    for lineno, line in enumerate(lines[1 : _MAX_MERGES + 1], start=2):
      parts = line.split()
      if len(parts) != 2:
        raise UserError(f"{merges_file}: line {lineno} is not a pair of symbols: {line!r}")
      merges.append((parts[0], parts[1]))
    pad = END
    config_file = os.path.join(path, "tokenizer_config.json")
    if os.path.exists(config_file):
      with open(config_file, encoding="utf-8") as f:
        pad_token = json.load(f).get("pad_token", END)
      pad = pad_token["content"] if isinstance(pad_token, dict) else (pad_token or END)
    return cls(vocab, merges, pad)

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)

  def _bpe(self, word: str) -> list[str]:
    if word in self._cache:
      return self._cache[word]
    symbols = [self._byte_table[b] for b in word.encode("utf-8")]
    symbols[-1] += "</w>"
    while len(symbols) > 1:
      pairs = set(zip(symbols[:-1], symbols[1:]))
      best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
      if best not in self.ranks:
        break
      merged, i = [], 0
      while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
          merged.append(symbols[i] + symbols[i + 1])
          i += 2
        else:
          merged.append(symbols[i])
          i += 1
      symbols = merged
    self._cache[word] = symbols
    return symbols

  def tokenize(self, text: str) -> list[str]:
    """BPE symbols of `text` (no start/end markers)."""
    return [s for word in split_words(clean_text(text)) for s in self._bpe(word)]

  def encode(self, text: str) -> list[int]:
    """Token ids without start/end markers."""
    return [self.vocab.get(s, self.unk_id) for s in self.tokenize(text)]

  def encode_batch(self, texts: Iterable[str], max_length: int) -> np.ndarray:
    """`int32[B, max_length]`: start, ids (truncated), end, then padding."""
    if max_length < 2:
      raise ValueError("max_length must leave room for the start and end tokens")
    texts = list(texts)
    out = np.full((len(texts), max_length), self.pad_id, np.int32)
    for row, text in enumerate(texts):
      ids = [self.bos_id] + self.encode(text)[: max_length - 2] + [self.eos_id]
      out[row, : len(ids)] = ids
    return out

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`, special tokens and padding dropped."""
    skip = {self.bos_id, self.eos_id, self.pad_id}
    text = "".join(self.inverse.get(int(i), "") for i in ids if int(i) not in skip)
    data = bytearray(self._byte_inverse[c] for c in text if c in self._byte_inverse)
    return data.decode("utf-8", errors="replace").replace("</w>", " ").strip()
