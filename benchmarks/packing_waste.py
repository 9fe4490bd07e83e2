"""Padding that packing leaves in the training batches of a stage's hand-over: next fit against best fit decreasing.

Rows are padded to the row length, as training lays them out. For a stage's hand-over, e.g. the
quickstart's (`python -m cascade.fit --config configs/quickstart.yaml`, windows of 128):

    python benchmarks/packing_waste.py runs/quickstart/stage_0/handover/train --row-length 128
"""

from __future__ import annotations

import argparse

from cascade.data.shards import load_parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="a hand-over split (its parts are read together)")
    parser.add_argument("--row-length", type=int, required=True)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    data = load_parts(args.path)
    lengths = data.lengths.float()
    print(f"{data.num_tokens:,} tokens in {data.num_sequences:,} sequences of {lengths.mean():.1f} +- {lengths.std():.1f} tokens "
          f"({int(lengths.min())}-{int(lengths.max())}); rows of {args.row_length}, batches of {args.batch_size}")
    for name, best_fit in (("next fit (in order)", False), ("best fit decreasing (training)", True)):
        waste = data.packing_waste(args.batch_size, args.row_length, fixed_length=True, best_fit=best_fit)
        print(f"{name:<32}{waste:>8.1%}")


if __name__ == "__main__":
    main()
