"""The building blocks of step-level search: a reasoning step (``steps``), scorers of partial solutions (``scorers``),
the tree of partial solutions that beam, dvts, particles and astar grow and prune (``tree``), and its drawing as SVG
or HTML for people (``drawing``, ``ponder ask --tree``)."""
