"""``xformers-zoo data show <task>``: a PNG grid of a task's images with their labels, for a
person to check by eye (e.g. that the Pathfinder markers sit on contour ends and the label says
whether one contour joins them).

Generated Pathfinder images are drawn directly (nothing is built); the other image tasks read
their prepared data set (built first if needed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from xformers_zoo.configs.base import DataConfig
from xformers_zoo.task_specs import TASKS

CAPTION = 14  # pixel rows under each tile for its label
CLASS_NAMES = {2: ("0: apart", "1: connected")}


def sample_images(config: DataConfig, split: str, count: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` images ``[n, h, w]`` of ``split`` and their labels."""
    task = TASKS.get(config.task)
    if task.image_shape is None:
        raise ValueError(f"{config.task} has no images to show; image tasks: "
                         f"{', '.join(t for t in TASKS.names() if TASKS.get(t).image_shape)}")
    if config.source == "generated":
        from xformers_zoo.data.pathfinder import draw_images
        from xformers_zoo.data.pathfinder_source import params_for

        return draw_images((params_for(config), config.generation_seed, split, 0, count))
    from xformers_zoo.data.builder import data_source

    source = data_source(config, split)
    picked = [source[i] for i in range(min(count, len(source)))]
    images = np.stack([np.asarray(ex["inputs"]).reshape(task.image_shape) for ex in picked])
    return images, np.array([int(ex["label"]) for ex in picked])


def grid(images: np.ndarray, labels: np.ndarray, *, columns: int, scale: int,
         names: tuple[str, ...] | None = None):
    """A Pillow image: the images upscaled ``scale`` times in a grid, each captioned with its
    label."""
    from PIL import Image, ImageDraw

    n, h, w = images.shape
    rows = -(-n // columns)
    tile_w, tile_h = w * scale, h * scale + CAPTION
    sheet = Image.new("L", (columns * (tile_w + 4) + 4, rows * (tile_h + 4) + 4), 96)
    pen = ImageDraw.Draw(sheet)
    for i, (pixels, label) in enumerate(zip(images, labels, strict=True)):
        x = 4 + (i % columns) * (tile_w + 4)
        y = 4 + (i // columns) * (tile_h + 4)
        tile = Image.fromarray(pixels).resize((w * scale, h * scale), Image.NEAREST)
        sheet.paste(tile, (x, y))
        text = names[label] if names else f"label {label}"
        pen.text((x + 2, y + h * scale + 1), text, fill=255)
    return sheet


def add_sample_arguments(parser: argparse.ArgumentParser, count: int) -> None:
    """The options that pick which images: how many, split, Pathfinder level, seed."""
    parser.add_argument("--count", type=int, default=count)
    parser.add_argument("--split", default="train", choices=["train", "validation", "test"])
    parser.add_argument("--level", default="contour14", choices=["baseline", "contour9",
                                                                 "contour14"])
    parser.add_argument("--seed", type=int, default=0)


def main(argv: list[str] | None = None) -> int:
    """Writes the grid; returns the exit status."""
    parser = argparse.ArgumentParser(prog="xformers-zoo data show", description=__doc__)
    parser.add_argument("task", help=f"one of {', '.join(TASKS.names())}")
    parser.add_argument("--out", default=None, help="PNG path (default <task>_samples.png)")
    add_sample_arguments(parser, count=16)
    parser.add_argument("--columns", type=int, default=4)
    parser.add_argument("--scale", type=int, default=0, help="upscale factor (0: to ~128 px)")
    parser.add_argument("--source", default=None, choices=["generated", "official"],
                        help="default: generated for Pathfinder, official for Image")
    parser.add_argument("--manual-dir", default=None)
    parser.add_argument("--data-dir", default="data")
    args = parser.parse_args(argv)
    try:
        task = TASKS.get(args.task)
        source = args.source or ("official" if task.name == "image" else "generated")
        config = DataConfig(task=task.name, source=source, level=args.level,
                            generation_seed=args.seed, manual_dir=args.manual_dir,
                            data_dir=args.data_dir)
        images, labels = sample_images(config, args.split, args.count)
        scale = args.scale or max(1, 128 // images.shape[1])
        names = CLASS_NAMES.get(task.num_classes) if task.name != "image" else None
        sheet = grid(images, labels, columns=args.columns, scale=scale, names=names)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out or f"{task.name}_samples.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    print(f"wrote {out} ({len(labels)} {task.name} images, labels {np.bincount(labels).tolist()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
