"""Output for people: aligned tables with units. One formatter for every table finegpt prints."""

from collections.abc import Sequence


def format_table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> str:
    """Align `rows` under `headers`: text left-aligned, numbers right-aligned.

    Cells are printed with str(); format numbers (and their units) before passing them in.
    """
    cells = [[str(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        if len(row) != len(headers):
            raise ValueError(f"row has {len(row)} cells, table has {len(headers)} columns: {row}")
        widths = [max(w, len(c)) for w, c in zip(widths, row)]

    def is_number(text: str) -> bool:
        # "12.5M", "3.1x", "85%", "1,024", "1.5 GiB": the leading number decides the alignment.
        head = text.split(" ")[0].rstrip("x%×kMBT").replace(",", "")
        try:
            float(head)
        except ValueError:
            return False
        return True

    def line(row):
        return "  ".join(c.rjust(w) if is_number(c) else c.ljust(w) for c, w in zip(row, widths)).rstrip()

    out = [line(list(headers)), "  ".join("-" * w for w in widths)]
    out += [line(row) for row in cells]
    return "\n".join(out)


def human_count(n: float) -> str:
    """12_345_678 -> '12.3M' (parameters, tokens)."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:.0f}"


def human_bytes(n: float) -> str:
    """Bytes in binary units: 1536 -> '1.5 KiB'."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"
