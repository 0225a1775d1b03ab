"""A structural check of CSV bytes (RFC 4180) before pandas parses them.

pandas' C parser is fast but lenient in ways that give silent wrong answers: a row
with a field missing is padded with NaN, a first data row with one field too many
becomes an index (shifting every column) or loses data, a stray quote is kept or
swallowed, and its "line" numbers count records, not the lines an editor shows.

This scan finds record boundaries with numpy over the raw bytes, checks every
record's field count against the header's, and checks the quoting. It takes
about 30 ms for a 30 MB file of numbers (pandas takes about 130 ms to parse it).
Scratch memory is one byte per input byte plus 8 per quote and per delimiter,
and a line of millions of delimiters that cannot match the header costs no
position array, so memory stays bounded on hostile input.

Quote parity is the key: in well-formed CSV every quoted field holds an even
number of quote characters, so a byte lies inside a quoted field exactly when an
odd number of quotes precede it. The quote check runs first and guarantees that.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from prefect_torch.errors import DataError

QUOTE = ord('"')
LF = ord("\n")
CR = ord("\r")

# Whitespace-only lines are skipped by pandas like empty ones; longer lines are
# not checked one by one (a bound on Python-level work per record).
_BLANK_CHECK_MAX = 4096
# Bytes examined at a time where a whole-file array would cost 8 bytes per byte.
_WINDOW = 8 * 1024 * 1024


@dataclass(frozen=True)
class CsvLayout:
    """Where the header and the data records of a well-formed CSV file are."""

    header_start: int
    header_end: int
    n_fields: int
    n_records: int
    # 1-based physical line of each data record (the line of its first byte),
    # or None when data record i simply sits on line i + 2.
    record_lines: np.ndarray | None


def scan_csv(raw: bytes, delimiter: str, source: str, window: int = _WINDOW,
             fields: int | None = None) -> CsvLayout:
    """Check quoting and field counts of ``raw``; raise ``DataError`` naming the line.

    ``window`` is how many bytes are examined at a time where a whole-file scratch
    array would be large (it bounds memory; results do not depend on it).
    ``fields``: the field count a strict parser already found on every non-blank
    line of a file without quotes; the per-field check (most of the scan's time)
    is then skipped and only the records and their lines are located.
    """
    return _Scan(raw, delimiter, source, window).layout(fields)


def locate(raw: bytes, pos: int) -> tuple[int, int]:
    """(line, character) of byte ``pos``, both 1-based, as a text editor shows them."""
    line_start = max(raw.rfind(b"\n", 0, pos), raw.rfind(b"\r", 0, pos)) + 1
    lone_cr = raw.count(b"\r", 0, pos) - raw.count(b"\r\n", 0, pos)
    line = raw.count(b"\n", 0, pos) + lone_cr + 1
    character = len(raw[line_start:pos].decode("utf-8", errors="replace")) + 1
    return line, character


class _Scan:
    def __init__(self, raw: bytes, delimiter: str, source: str, window: int = _WINDOW):
        self.raw = raw
        self.window = window
        self.arr = np.frombuffer(raw, dtype=np.uint8)
        self.n = len(raw)
        self.delim = ord(delimiter)
        self.delimiter = delimiter
        self.source = source
        quotes = np.flatnonzero(self.arr == QUOTE) if raw.find(b'"') >= 0 else None
        self.quotes = quotes if quotes is not None and quotes.size else None
        self.terms = self._terminators()
        self._delims: np.ndarray | None = None

    def layout(self, fields: int | None = None) -> CsvLayout:
        if self.quotes is not None:
            self._check_quotes()
        record_terms = self._outside(self.terms)
        starts = np.concatenate(([0], record_terms + 1))
        ends = np.concatenate((record_terms, [self.n]))
        if starts[-1] >= self.n:  # the file ends with a line break: no record after it
            starts, ends = starts[:-1], ends[:-1]
        content_ends = ends - ((ends > starts) & (self.arr[np.maximum(ends - 1, 0)] == CR))
        filled = np.flatnonzero(content_ends > starts)
        if fields is not None and fields > 1 and self.quotes is None and filled.size:
            k = fields - 1
        else:
            k = self._uniform_delimiters(starts[filled], ends[filled])
        if k:
            # Every non-empty record has the header's field count: nothing to report.
            header, data = int(filled[0]), filled[1:]
            expected = k + 1
        else:
            fields = self._field_counts(starts, ends)
            blank = self._blank(starts, content_ends, fields)
            kept = np.flatnonzero(~blank)
            if kept.size == 0:
                raise DataError(f"{self.source} holds no CSV rows, only blank lines. Point to a CSV "
                                "file with a header row and data rows.")
            header, data = int(kept[0]), kept[1:]
            expected = int(fields[header])
            wrong = data[fields[data] != expected]
            if wrong.size:
                record = int(wrong[0])
                self._field_count_error(int(starts[record]), int(content_ends[record]),
                                        int(ends[record]), int(fields[record]), expected)

        if data.size == starts.size - 1 and record_terms.size == self.terms.size:
            lines = None  # one record per line, the header on line 1
        else:
            lines = np.searchsorted(self.terms, starts[data]) + 1
        return CsvLayout(
            header_start=int(starts[header]),
            header_end=int(content_ends[header]),
            n_fields=expected,
            n_records=int(data.size),
            record_lines=lines,
        )

    def _uniform_delimiters(self, starts: np.ndarray, ends: np.ndarray) -> int:
        """k > 0 when every record holds exactly the k delimiters of the first: the
        common case, checked in O(delimiters) without counting record by record.

        With k delimiters per record, the sorted delimiter positions reshaped to
        (records, k) put row j's first and last inside record j; with the total
        count right, that proves each record has exactly k. Returns 0 otherwise.
        """
        if starts.size == 0:
            return 0
        if self.quotes is None:
            k = self.raw.count(self.delimiter.encode(), 0, int(ends[0]))
            if k == 0:  # one column: blank lines need the per-record pass
                return 0
            # Count before taking positions: a hostile line of delimiters costs no memory.
            mask = self.arr == self.delim
            if np.count_nonzero(mask) != k * starts.size:
                return 0
            positions = np.flatnonzero(mask)
        else:
            positions = self._outside_delimiters()
            k = int(np.searchsorted(positions, ends[0]))
            if k == 0 or positions.size != k * starts.size:
                return 0
        rows = positions.reshape(starts.size, k)
        return k if bool((rows[:, 0] >= starts).all() and (rows[:, -1] < ends).all()) else 0

    def _outside_delimiters(self) -> np.ndarray:
        """Positions of the delimiters that separate fields (not those inside quotes).

        Found window by window, so the scratch memory stays bounded whatever the input.
        Where quotes outnumber delimiters, each delimiter's quote parity decides;
        otherwise each quoted span (an opening and its closing quote) masks the
        delimiters between its ends with a +1/-1 mark and a running sum.
        """
        if self._delims is None:
            parts = [np.zeros(0, dtype=np.int64)]
            q = self.quotes
            opens, closes = q[0::2], q[1::2]  # paired: _check_quotes ran
            for lo in range(0, self.n, self.window):
                found = np.flatnonzero(self.arr[lo:lo + self.window] == self.delim) + lo
                if found.size:
                    # The spans that can hold this window's delimiters.
                    first = int(np.searchsorted(closes, found[0]))
                    last = int(np.searchsorted(opens, found[-1], side="right"))
                    if last - first > found.size:
                        before = np.searchsorted(q[2 * first:2 * last], found) + 2 * first
                        found = found[before % 2 == 0]
                    elif last > first:
                        a = np.searchsorted(found, opens[first:last])
                        b = np.searchsorted(found, closes[first:last])
                        holding = b > a  # distinct a's and b's: spans are disjoint
                        if holding.any():
                            marks = np.zeros(found.size + 1, dtype=np.int8)
                            marks[a[holding]] += 1
                            marks[b[holding]] -= 1
                            found = found[np.cumsum(marks[:-1], dtype=np.int8) == 0]
                parts.append(found)
            self._delims = np.concatenate(parts)
        return self._delims

    def _terminators(self) -> np.ndarray:
        """Byte offsets of every line break: LF, and a CR not followed by LF."""
        lf = np.flatnonzero(self.arr == LF)
        if self.raw.find(b"\r") < 0:
            return lf
        cr = np.flatnonzero(self.arr == CR)
        following = self.arr[np.minimum(cr + 1, self.n - 1)]
        lone = cr[(cr + 1 >= self.n) | (following != LF)]
        return np.sort(np.concatenate((lf, lone))) if lone.size else lf

    def _outside(self, positions: np.ndarray) -> np.ndarray:
        """The positions not inside a quoted field (an even number of quotes before them)."""
        if self.quotes is None or positions.size == 0:
            return positions
        return positions[np.searchsorted(self.quotes, positions) % 2 == 0]

    def _field_counts(self, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
        if self.quotes is not None:
            delims = self._outside_delimiters()
            return np.searchsorted(delims, ends) - np.searchsorted(delims, starts) + 1
        # Records grouped into windows of at most self.window bytes, counted with one
        # reduceat each (it works on an int64 copy of its input, so keep that small);
        # a record longer than a window is counted on its own.
        counts = np.empty(starts.size, dtype=np.int64)
        delimiter = self.delimiter.encode()
        i = 0
        while i < starts.size:
            lo = int(starts[i])
            if self.n - lo <= self.window:
                j = starts.size
            else:  # the records that end within the window (at least one)
                j = max(int(np.searchsorted(starts, lo + self.window, side="right")) - 1, i + 1)
            hi = int(starts[j]) if j < starts.size else self.n
            if j == i + 1:
                counts[i] = self.raw.count(delimiter, lo, hi)
            else:
                counts[i:j] = np.add.reduceat(self.arr[lo:hi] == self.delim, starts[i:j] - lo, dtype=np.int64)
            i = j
        return counts + 1

    def _blank(self, starts: np.ndarray, content_ends: np.ndarray, fields: np.ndarray) -> np.ndarray:
        """Records pandas skips: empty lines and lines of spaces or tabs only."""
        blank = content_ends == starts
        candidates = np.flatnonzero((fields == 1) & ~blank & (content_ends - starts <= _BLANK_CHECK_MAX))
        if candidates.size > 10_000:  # a one-column file: leave its rows alone
            return blank
        for i in candidates:
            if not self.raw[starts[i]:content_ends[i]].strip(b" \t"):
                blank[i] = True
        return blank

    def _check_quotes(self) -> None:
        q, arr, n, d = self.quotes, self.arr, self.n, self.delim
        openings, closings = q[0::2], q[1::2]
        # An opening quote starts a field (file start, after a delimiter or line break),
        # or is the second of a doubled "" inside a quoted field.
        before = arr[np.maximum(openings - 1, 0)]
        ok_open = (openings == 0) | (before == d) | (before == LF) | (before == CR) | (before == QUOTE)
        # A closing quote ends the field (delimiter, line break, file end), or is the
        # first of a doubled "".
        after = arr[np.minimum(closings + 1, n - 1)]
        ok_close = (closings + 1 >= n) | (after == d) | (after == LF) | (after == CR) | (after == QUOTE)
        bad_open = openings[~ok_open]
        bad_close = closings[~ok_close]
        first_open = int(bad_open[0]) if bad_open.size else n
        first_close = int(bad_close[0]) if bad_close.size else n
        if first_open < first_close:
            raise DataError(
                f"{self.source}, {self._where(first_open)}: a '\"' inside a field that is not quoted. "
                "Per RFC 4180, a field containing quotes must be wholly quoted, with each inner quote "
                'doubled (2"x becomes "2""x"), and no space may come before its opening quote. '
                "Fix the field (re-exporting from a spreadsheet or pandas quotes it correctly)."
            )
        if first_close < n:
            raise DataError(
                f"{self.source}, {self._where(first_close)}: text follows the closing quote of a quoted "
                'field ("ab"c). Quote the whole field and double the quotes inside it ("ab""c").'
            )
        if q.size % 2:
            # The unclosed field starts at the last quote that is a real opening,
            # not the second half of a doubled "".
            real = openings[before != QUOTE]
            start = int(real[-1]) if real.size else int(q[-1])
            truncated = "" if self.raw.endswith((b"\n", b"\r")) else (
                " The file does not end with a line break, so it may have been cut short: "
                "re-export or re-download it."
            )
            raise DataError(
                f"{self.source}, {self._where(start)}: the quoted field that starts here is never "
                "closed; the file ends inside it. Close the quote, and double any quote that is part "
                f"of the value (\"say \"\"hi\"\"\").{truncated}"
            )

    def _field_count_error(self, start: int, content_end: int, end: int, got: int, expected: int) -> None:
        line, _ = locate(self.raw, start)
        message = (f"{self.source}, line {line}: {got} field{'s' if got != 1 else ''}, but the header "
                   f"has {expected}.")
        d = self.delimiter
        if got > expected and content_end > start and self.raw[content_end - 1] == self.delim:
            hint = (f" The line ends with a {d!r}: remove the trailing delimiter(s), or name the extra "
                    "column in the header.")
        elif got < expected and end == self.n and not self.raw.endswith((b"\n", b"\r")):
            hint = (" It is the last line and the file does not end with a line break: the file looks "
                    "cut short. Re-export or re-download it.")
        elif got < expected:
            hint = (f" A field is missing: every row needs a value, or an empty field between two "
                    f"{d!r}, for each column.")
        else:
            hint = (f" There is an extra field: a value that contains {d!r} must be quoted "
                    f"(\"1{d}5\"), or the header lacks a column name.")
        raise DataError(message + hint)

    def _where(self, pos: int) -> str:
        line, character = locate(self.raw, pos)
        return f"line {line}, character {character}"
