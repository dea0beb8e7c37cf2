"""Byte-level BPE: the tokenizer of GPT-2 (Radford et al. 2019, section 2.2) and SmolLM2.

Text -> ids in three steps:

    1. pre-tokenize: cut the text into words with a regex, so merges never cross a
       word boundary (GPT-2's pattern keeps a leading space with the word: " world")
    2. bytes: each word's UTF-8 bytes, each byte shown as one printable character
       (`bytes_to_unicode`: space -> 'Ġ', newline -> 'Ċ'), so any string can be encoded
    3. merge: repeatedly merge the adjacent pair with the lowest rank in the merges
       list until no ranked pair is left; look each resulting token up in the vocab
       (done with a heap in O(n log n) for a word of n bytes: see `BPETokenizer.bpe`)

    decode(ids) = UTF-8 decoding of the concatenated token bytes, so decode(encode(s)) == s
    when the vocab has a token for each of the 256 bytes (GPT-2's does).

A vocab may lack some single-byte tokens: SmolLM2's has none for 21 bytes (0xC0, 0xC1 and
0xF5..0xFF never occur in UTF-8; 0x04, 0x06, 0x13, 0x14, 0x16, 0x1D, 0xF1, 0xF2 are rare).
Such bytes are dropped from each word before step 3, exactly as Hugging Face `tokenizers`
does, so the bytes around them may merge ("!\x04!" encodes as "!!"); decode cannot bring
them back.

GPT-2's pattern uses `\\p{L}` (letter) and `\\p{N}` (number), which the stdlib `re` lacks.
We build the two character classes exactly from `unicodedata` categories (L* and N*)
and spell out `\\s` as Unicode's White_Space list (stdlib `\\s` also matches
U+001C..U+001F, which `regex` and Hugging Face `tokenizers` do not). The one difference
left is the Unicode version: Python's tables (14.0 in Python 3.11) may not know
characters that newer libraries class as letters.

`<|endoftext|>` in the text: by default we encode it as plain text, as GPT-2's own
encoder.py does, so a document cannot inject control tokens; pass
`allowed_special=True` to map special-token strings to their ids. Insert BOS/EOS by id.
"""

import functools
import heapq
import json
import os
import re
import unicodedata

# Unicode White_Space property (PropList.txt); differs from Python's str.isspace().
_WHITESPACE = r"\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> dict:
    """GPT-2's byte -> printable character map: printable bytes map to themselves, the
    rest (control bytes, space, ...) to code points from 256 on, so vocab files stay text."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(keep, chars)}


@functools.lru_cache(maxsize=None)
def _char_class(major: str) -> str:
    """Body of a `re` character class matching Unicode general category `major*`, e.g.
    'L' for \\p{L}: all code points of the category as \\U ranges (built once, ~0.3 s)."""
    category, ranges, start = unicodedata.category, [], None
    for cp in range(0x110001):
        inside = cp <= 0x10FFFF and category(chr(cp))[0] == major
        if inside and start is None:
            start = cp
        elif not inside and start is not None:
            ranges.append(f"\\U{start:08x}" if start == cp - 1 else f"\\U{start:08x}-\\U{cp - 1:08x}")
            start = None
    return "".join(ranges)


@functools.lru_cache(maxsize=None)
def gpt2_pattern() -> re.Pattern:
    """GPT-2's pre-tokenizer, written for the stdlib `re`. The original (encoder.py):
    's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"""
    L, N, S = _char_class("L"), _char_class("N"), _WHITESPACE
    return re.compile(rf"'s|'t|'re|'ve|'m|'ll|'d| ?[{L}]+| ?[{N}]+| ?[^{S}{L}{N}]+|[{S}]+(?![^{S}])|[{S}]+")


@functools.lru_cache(maxsize=None)
def _digit_splitter() -> re.Pattern:
    return re.compile(f"([{_char_class('N')}])")


def merge_reference(ranks: dict, word: str) -> list:
    """GPT-2's encoder.py merge loop, the definition: merge the lowest-ranked adjacent pair,
    all its occurrences left to right, until no pair has a rank (O(n) per rule used)."""
    parts = list(word)
    while len(parts) > 1:
        best = min(set(zip(parts, parts[1:])), key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(parts):
            if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


class BPETokenizer:
    """Byte-level BPE tokenizer.

    encoder:  token string (in `bytes_to_unicode` characters) -> id
    merges:   ranked merge rules, best first: pairs ('Ġ', 't') or strings 'Ġ t'
    special_tokens: special token string -> id (e.g. {'<|endoftext|>': 50256})
    bos_id:   id put in front of a document by the activation collector (None: none)
    split_digits: cut every \\p{N} character into its own word before the GPT-2 pattern
              (SmolLM2's pre-tokenizer: HF `Digits(individual_digits=True)`, then ByteLevel)
    """

    def __init__(self, encoder: dict, merges, special_tokens=None, bos_id=None,
                 split_digits: bool = False, cache_size: int = 1_000_000):
        self.encoder = dict(encoder)
        if not self.encoder:
            raise ValueError("the vocab (encoder) is empty")
        self.special_tokens = dict(special_tokens or {})
        self.bos_id = bos_id
        self.split_digits = split_digits
        self.bpe_ranks = {}
        for rank, m in enumerate(merges):
            pair = tuple(m.split(" ")) if isinstance(m, str) else tuple(m) if isinstance(m, (tuple, list)) else ()
            if len(pair) != 2 or not all(isinstance(p, str) and p for p in pair):
                raise ValueError(f"merge {rank} is {m!r:.80}; expected a pair of token strings or 'a b'")
            # both parts and the result must be tokens (HF `tokenizers` refuses such files
            # too: MergeTokenOutOfVocabulary); else encode would fail on some text, or not at all
            unknown = [t for t in (*pair, pair[0] + pair[1]) if t not in self.encoder]
            if unknown:
                raise ValueError(f"merge {rank} {m!r:.80} uses or makes {unknown!r:.80}, not in the vocab")
            self.bpe_ranks.setdefault(pair, rank)  # a repeated rule keeps its best rank
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        # Bytes whose character is not a token (SmolLM2: 21 of 256) are dropped from a word
        # before merging, as Hugging Face `tokenizers` does (models/bpe/model.rs, merge_word:
        # with no unk_token a character not in the vocab is skipped), so their neighbours
        # can merge: "!\x04!" -> "!!". byte -> its character, or "".
        self.missing_bytes = sorted(b for b, c in self.byte_encoder.items() if c not in self.encoder)
        self._byte_chars = [self.byte_encoder[b] if b not in self.missing_bytes else "" for b in range(256)]
        for name, i in self.special_tokens.items():
            if self.encoder.get(name, i) != i:
                raise ValueError(f"special token {name!r} has id {i} but the vocab says {self.encoder[name]}")
        self.vocab_size = 1 + max(max(self.encoder.values()), max(self.special_tokens.values(), default=-1))
        if bos_id is not None and not 0 <= bos_id < self.vocab_size:
            raise ValueError(f"bos_id {bos_id} outside the vocab (size {self.vocab_size})")
        # id -> bytes for decode; tokens outside the byte alphabet (added special tokens
        # such as '<|im_start|>' in some vocabs) decode as their literal text
        self._id_bytes = {}
        for tok, i in self.encoder.items():
            if all(c in self.byte_decoder for c in tok):
                self._id_bytes[i] = bytes(self.byte_decoder[c] for c in tok)
            else:
                self._id_bytes[i] = tok.encode("utf-8")
        for tok, i in self.special_tokens.items():
            self._id_bytes[i] = tok.encode("utf-8")
        self._cache, self._cache_size = {}, cache_size  # word -> ids: text repeats words a lot

    def pretokenize(self, text: str) -> list:
        """Cut text into the words that BPE merges inside of."""
        if not self.split_digits:
            return gpt2_pattern().findall(text)
        words = []
        for i, piece in enumerate(_digit_splitter().split(text)):
            if i % 2:  # odd pieces are the single digits captured by the split
                words.append(piece)
            elif piece:
                words.extend(gpt2_pattern().findall(piece))
        return words

    def bpe(self, word: str) -> list:
        """Merge the byte characters of one word into tokens. The definition (GPT-2's
        encoder.py), which costs O(n) per merge rule used, so up to O(n^2) for n characters:

            while some adjacent pair has a rank:
                best = the pair with the lowest rank
                merge every occurrence of best, left to right (in "aaa", the first two a's)

        The same merges in O(n log n): the symbols form a linked list (nxt, prv, indexed by
        the position of each symbol's first character), and a heap holds (rank, position)
        for each adjacent pair that has a rank. A sweep pops every entry of the lowest rank,
        so the occurrences of `best` come out left to right, and merges them; the pairs that
        a sweep creates are pushed only after it ends (in the loop above they wait for the
        next `min` too). A merge changes its symbols, so an entry whose pair no longer has
        the entry's rank is stale (its symbol was merged away, or its neighbour changed) and
        is skipped. A pair a merge creates contains the merged symbol, so it is never `best`
        itself: each sweep merges exactly what one pass of the loop above merges."""
        ranks = self.bpe_ranks
        sym = list(word)                      # sym[i]: the symbol starting at character i, '' once merged away
        n = len(sym)
        nxt, prv = list(range(1, n + 1)), list(range(-1, n - 1))  # n / -1: no neighbour
        heap = [(ranks[pair], i) for i, pair in enumerate(zip(sym, sym[1:])) if pair in ranks]
        heapq.heapify(heap)
        while heap:
            rank, sweep = heap[0][0], []
            while heap and heap[0][0] == rank:
                sweep.append(heapq.heappop(heap)[1])   # ascending positions
            touched = []
            for i in sweep:
                j = nxt[i]
                if j >= n or ranks.get((sym[i], sym[j])) != rank:
                    continue                            # stale entry
                sym[i], sym[j] = sym[i] + sym[j], ""    # merge j into i, unlink j
                nxt[i] = nxt[j]
                if nxt[i] < n:
                    prv[nxt[i]] = i
                touched += [prv[i], i]                  # the pairs (prv, i) and (i, nxt) are new
            for i in touched:
                if i >= 0 and sym[i] and nxt[i] < n:
                    pair = (sym[i], sym[nxt[i]])
                    if pair in ranks:
                        heapq.heappush(heap, (ranks[pair], i))
        return [s for s in sym if s]

    def _encode_word(self, word: str) -> list:
        ids = self._cache.get(word)
        if ids is None:
            chars = "".join([self._byte_chars[b] for b in word.encode("utf-8")])
            try:
                ids = [self.encoder[tok] for tok in self.bpe(chars)]
            except KeyError as e:
                raise ValueError(f"merges produce token {e.args[0]!r}, which is not in the vocab") from None
            if len(self._cache) >= self._cache_size:
                self._cache.clear()  # bound memory on endless streams of new words
            self._cache[word] = ids
        return ids

    def encode(self, text: str, allowed_special: bool = False) -> list:
        """str -> list of token ids. Special-token strings in `text` are plain text unless
        `allowed_special` (then each maps to its id)."""
        if not isinstance(text, str):
            raise ValueError(f"encode expects a str, got {type(text).__name__}")
        if allowed_special and self.special_tokens:
            specials = sorted(self.special_tokens, key=len, reverse=True)  # longest match first
            pieces = re.split("(" + "|".join(map(re.escape, specials)) + ")", text)
            ids = []
            for i, piece in enumerate(pieces):
                ids.extend([self.special_tokens[piece]] if i % 2 else self.encode(piece))
            return ids
        ids = []
        for word in self.pretokenize(text):
            ids.extend(self._encode_word(word))
        return ids

    def decode(self, ids) -> str:
        """list of ids -> str. Bytes that do not form valid UTF-8 (a cut multi-byte
        character) become U+FFFD, as in GPT-2's encoder.py."""
        try:
            data = b"".join(self._id_bytes[int(i)] for i in ids)
        except KeyError as e:
            raise ValueError(f"token id {e.args[0]} is not in the vocab (size {self.vocab_size})") from None
        return data.decode("utf-8", errors="replace")

    @classmethod
    def from_files(cls, directory, special_tokens=("<|endoftext|>",), bos_token="<|endoftext|>",
                   split_digits: bool = False) -> "BPETokenizer":
        """Load `vocab.json` + `merges.txt` (Hugging Face names) or `encoder.json` +
        `vocab.bpe` (OpenAI's release); the two pairs hold the same data."""
        directory = os.fspath(directory)
        for vocab_name, merges_name in (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")):
            vocab_path = os.path.join(directory, vocab_name)
            merges_path = os.path.join(directory, merges_name)
            if os.path.isfile(vocab_path) and os.path.isfile(merges_path):
                break
        else:
            raise ValueError(f"no tokenizer files in {directory!r}: need vocab.json + merges.txt "
                             "or encoder.json + vocab.bpe")
        with open(vocab_path, encoding="utf-8") as f:
            encoder = json.load(f)
        with open(merges_path, encoding="utf-8") as f:
            # first line is a '#version: 0.2' header; the file ends with a newline
            merges = [line for line in f.read().split("\n") if line and not line.startswith("#version")]
        missing = [t for t in special_tokens if t not in encoder]
        if missing:
            raise ValueError(f"special tokens {missing} not found in {vocab_path}")
        specials = {t: encoder[t] for t in special_tokens}
        if bos_token is not None and bos_token not in encoder:
            raise ValueError(f"bos token {bos_token!r} not found in {vocab_path}")
        bos_id = None if bos_token is None else encoder[bos_token]
        return cls(encoder, merges, specials, bos_id=bos_id, split_digits=split_digits)
