"""The built-in concept world: a procedurally rendered toy world, a tiny text-to-image model trained on it,
and a judge that reads its pictures. It is the command line's embedded default model and the project's
scientific test bench (no GPU, no downloads).
"""
