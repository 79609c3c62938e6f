"""How big a YAML text is once built, found before anything is built.

libyaml's composer recurses in C (60,000 nested `[` overflow its stack: a crash, not an exception),
and a 500-byte "billion laughs" of aliases builds into millions of values. Both are found here from
libyaml's events, with no more memory than the nesting depth, stopping at the first event past a
limit: an alias counts the values of its anchor (anchors are per document).
"""

from __future__ import annotations

from dataclasses import dataclass

import yaml


@dataclass(frozen=True)
class Past:
    document: int   # 0-based index of the document where a limit was passed
    line: int       # 1-based line of the event that passed it


def first_past_limits(data: bytes, max_values: int, max_depth: int) -> Past | None:
    """Where `data` first has more than `max_values` values in one document (aliases expanded), or
    collections nested more than `max_depth` deep; None when it never does.

    Raises yaml.YAMLError for text libyaml cannot parse: the loader says it better, with its document.
    """
    document, count = -1, 0
    sizes: dict[str, int] = {}                      # anchor -> values it stands for
    open_nodes: list[tuple[str | None, int]] = []   # (anchor, count before the collection)
    for event in yaml.parse(data, Loader=yaml.CSafeLoader):
        if isinstance(event, yaml.DocumentStartEvent):
            document, count = document + 1, 0
            sizes.clear()
        elif isinstance(event, yaml.AliasEvent):
            # Missing: undefined, or inside its own anchor; the loader refuses both.
            count += sizes.get(event.anchor, 0) if event.anchor is not None else 0
        elif isinstance(event, yaml.CollectionStartEvent):
            open_nodes.append((event.anchor, count))
            count += 1
        elif isinstance(event, yaml.ScalarEvent):
            count += 1
            if event.anchor is not None:
                sizes[event.anchor] = 1
        elif isinstance(event, yaml.CollectionEndEvent):
            anchor, before = open_nodes.pop()
            if anchor is not None:
                sizes[anchor] = count - before
        if count > max_values or len(open_nodes) > max_depth:
            line = event.start_mark.line + 1 if event.start_mark is not None else 0   # the parser marks every event
            return Past(max(document, 0), line)
    return None
