"""First-fit packing over a bounded window of open packs: one pass, O(rows x window), memory O(window).

Each sample goes into the first open pack with room for it, else into a new pack; when more than
`window` packs are open, the oldest is closed (emitted). What is emitted depends only on the
lengths in order, so preprocessing with any number of workers gives the same layout."""


class FirstFit:
    def __init__(self, seq_length: int, window: int = 64):
        self.seq_length, self.window = seq_length, window
        self.open = []  # [room left, [sample ids]] in the order the packs were opened

    def add(self, i: int, n: int) -> list[list[int]]:
        """Place sample i of n tokens; -> the packs this closes (each a list of sample ids)."""
        if n > self.seq_length:
            raise ValueError(f"sample {i}: {n} tokens > seq_length {self.seq_length} (fit_length first)")
        for p in self.open:
            if p[0] >= n:
                p[0] -= n
                p[1].append(i)
                return []
        self.open.append([self.seq_length - n, [i]])
        if len(self.open) > self.window:
            return [self.open.pop(0)[1]]
        return []

    def finish(self) -> list[list[int]]:
        closed, self.open = [p[1] for p in self.open], []
        return closed
