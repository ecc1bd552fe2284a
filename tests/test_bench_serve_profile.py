"""bench.serve_profile sums py-spy's raw samples per thread and, for one thread, per function counted once per
sample however often it recurs on the stack (hand-made samples: the sums written out plainly)."""

from __future__ import annotations

from bench.serve_profile import shares

RAW = """\
thread (1): MainThread;run (a.py:1);handle (b.py:2);parse (c.py:3) 5
thread (1): MainThread;run (a.py:1);handle (b.py:2);handle (b.py:9) 3
thread (1): MainThread;run (a.py:1) 2
thread (7): centerid-inference;loop (d.py:4);infer (e.py:5) 10
not a sample line
"""


def test_samples_are_summed_per_thread_and_per_function_of_one_thread() -> None:
    per_thread, per_function, total = shares(RAW, "MainThread")
    assert per_thread == {"thread (1): MainThread": 10, "thread (7): centerid-inference": 10}
    assert total == 10
    assert per_function == {"run": 10, "handle": 8, "parse": 5}  # handle twice in one stack: counted once
    _, inference, inference_total = shares(RAW, "centerid-inference")
    assert inference == {"loop": 10, "infer": 10} and inference_total == 10
