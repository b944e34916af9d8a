"""What makes a ``Network`` a container of its layers (``len``, indexing, slicing,
iteration) and its ``summary()`` table: kept here so network.py stays about training."""
WIDTH = 100          # summary() rows fit this many columns


class LayerSequence:
    """Mixin for ``Network``: ``len(net)``, ``net[i]`` (a layer), ``net[i:j]`` (a new
    Network holding the same layer objects, so they share weights; compile state,
    optimizer and history are not shared), ``iter(net)``; ``repr``/``print`` show
    ``summary()``."""

    def __len__(self):
        return len(self.layers)

    def __iter__(self):
        return iter(list(self.layers))

    def __getitem__(self, index):
        if isinstance(index, slice):
            return type(self)(self.layers[index])
        if isinstance(index, bool) or not hasattr(index, "__index__"):
            raise TypeError(f"Network indices must be integers or slices, got "
                            f"{type(index).__name__}")
        n = len(self.layers)
        if not -n <= index.__index__() < n:
            raise IndexError(f"Network index {index} out of range for {n} layers")
        return self.layers[index]

    def __bool__(self):          # a Network with no layers yet is still a network
        return True

    def __repr__(self):
        return self.summary()


def _cell(text, width):
    """``text`` cut to ``width`` characters (an ellipsis marks the cut)."""
    return text if len(text) <= width else text[:width - 3] + "..."


def summary_table(rows, footer):
    """Rows of (index, layer, output shape, params) strings as a table whose lines fit
    WIDTH columns (the layer column is cut when it must be), then ``footer``."""
    rows = [(r[0], r[1], _cell(r[2], WIDTH // 3), r[3]) for r in rows]
    room = WIDTH - 6 - sum(max(len(r[k]) for r in rows) for k in (0, 2, 3))
    rows = [(r[0], _cell(r[1], max(room, 10)), r[2], r[3]) for r in rows]
    widths = [max(len(r[k]) for r in rows) for k in range(4)]
    line = "-" * min(sum(widths) + 6, WIDTH)
    text = [line] + ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    text.insert(2, line)
    return "\n".join(text + [line, _cell(footer, WIDTH)])
