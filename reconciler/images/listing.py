"""What `reconciler images list` prints: a table of the stored images, or their JSON documents."""

from __future__ import annotations

import dataclasses
from typing import Any

from reconciler.images.store import StoredImage
from reconciler.units import format_bytes_approx


def image_doc(image: StoredImage) -> dict[str, Any]:
    return dataclasses.asdict(image)


def _ago(t: float, now: float) -> str:
    seconds = max(0, int(now - t))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def images_table(images: list[StoredImage], now: float) -> str:
    """REFERENCES, IMAGE ID (12 hex, as docker shows it), LAYERS, SIZE, CREATED (image config), PULLED, LAST USED."""
    rows = [["REFERENCES", "IMAGE ID", "LAYERS", "SIZE", "CREATED", "PULLED", "LAST USED"]]
    for image in sorted(images, key=lambda i: -i.last_used):
        rows.append([",".join(image.references) or "-", image.id.removeprefix("sha256:")[:12],
                     str(len(image.layer_ids)),
                     format_bytes_approx(image.size_bytes), (image.created or "-")[:19], _ago(image.pulled_at, now),
                     _ago(image.last_used, now)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(widths[i]) for i, c in enumerate(row)).rstrip() for row in rows)
