"""`python -m mmpeft.data.write_shards TABLE PATTERN`: an open_clip caption table as WebDataset shards.

Why here: users with a caption table and data too big for a folder of files convert once, and the shards then
train with `data.source: webdataset`; the shipped shards recipe is written this way.
"""

from __future__ import annotations

from pathlib import Path

from mmpeft.data.captions import read_caption_table
from mmpeft.data.errors import DataError
from mmpeft.data.shards import IMAGE_EXTENSIONS
from mmpeft.specs import DataSpec


def write_shards(table: str, pattern: str, per_shard: int = 1000, spec: DataSpec | None = None) -> list[str]:
    """Convert an open_clip caption table into WebDataset shards (`key.<image ext>` + `key.txt`, plus `key.cls`
    with a label column) with webdataset's ShardWriter; `pattern` has a printf field (`train-%04d.tar`)."""
    import webdataset as wds

    _check_pattern(pattern, per_shard)
    spec = spec or DataSpec(source="captions", path=table)
    rows, _ = read_caption_table(table, spec)
    bad = [f"{row.source}: {row.problem}" for row in rows if row.problem]
    if bad:
        raise DataError(f"{table}: {len(bad)} bad rows, for example {bad[0]}")
    if not rows:
        raise DataError(f"{table}: no rows below the header, nothing to write")
    names = [pattern % n for n in range(-(-len(rows) // per_shard))]
    Path(pattern).parent.mkdir(parents=True, exist_ok=True)
    try:
        with wds.ShardWriter(pattern, maxcount=per_shard, verbose=0) as sink:
            for i, row in enumerate(rows):
                ext = Path(str(row.image)).suffix.lower().lstrip(".")
                image = Path(row.image).read_bytes()
                sample = {"__key__": f"{i:08d}", ext if ext in IMAGE_EXTENSIONS else "png": image}
                sample.update({"txt": row.text} if row.text else {})
                sample.update({"cls": row.label} if row.label is not None else {})
                sink.write(sample)
    except BaseException:
        for name in names:  # no half-written set of shards left behind
            Path(name).unlink(missing_ok=True)
        raise
    return names


def _check_pattern(pattern: str, per_shard: int) -> None:
    """The output pattern names one shard per number (one printf field) and shards hold at least one sample."""
    if per_shard < 1:
        raise DataError(f"--per-shard: {per_shard}; a shard holds at least 1 sample")
    try:
        distinct = pattern % 0 != pattern % 1
    except (TypeError, ValueError):
        distinct = False
    if not distinct:
        raise DataError(f"{pattern!r}: the output pattern needs one printf field for the shard number, e.g. "
                        "shards/train-%04d.tar")


def main(argv: list[str] | None = None) -> None:
    """`python -m mmpeft.data.write_shards TABLE PATTERN [--per-shard N] [--separator ,]`."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m mmpeft.data.write_shards",
                                     description="Write an open_clip caption table (filepath, title) as WebDataset "
                                                 "shards (key.png + key.txt per sample).")
    parser.add_argument("table")
    parser.add_argument("pattern", help="output shards with a printf field, e.g. shards/train-%%04d.tar")
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--separator", default=None, help="column separator of the table (default: tab)")
    args = parser.parse_args(argv)
    spec = DataSpec(source="captions", path=args.table, separator=args.separator)
    try:
        written = write_shards(args.table, args.pattern, args.per_shard, spec)
    except DataError as error:
        parser.exit(2, f"error: {error}\n")
    print(f"wrote {len(written)} shards: {written[0]} ... {written[-1]}" if len(written) > 1 else
          f"wrote {written[0]}", flush=True)


if __name__ == "__main__":
    main()
