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

    spec = spec or DataSpec(source="captions", path=table)
    rows, _ = read_caption_table(table, spec)
    bad = [f"{row.source}: {row.problem}" for row in rows if row.problem]
    if bad:
        raise DataError(f"{table}: {len(bad)} bad rows, for example {bad[0]}")
    Path(pattern).parent.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(pattern, maxcount=per_shard, verbose=0) as sink:
        for i, row in enumerate(rows):
            ext = Path(str(row.image)).suffix.lower().lstrip(".")
            sample = {"__key__": f"{i:08d}", ext if ext in IMAGE_EXTENSIONS else "png": Path(row.image).read_bytes()}
            sample.update({"txt": row.text} if row.text else {})
            sample.update({"cls": row.label} if row.label is not None else {})
            sink.write(sample)
    return [pattern % n for n in range(-(-len(rows) // per_shard))]


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
    written = write_shards(args.table, args.pattern, args.per_shard, spec)
    print(f"wrote {len(written)} shards: {written[0]} ... {written[-1]}" if len(written) > 1 else
          f"wrote {written[0]}", flush=True)


if __name__ == "__main__":
    main()
