"""bench/extract_profile.py: each py-spy sample of extract lands in the category of what it was doing."""

from __future__ import annotations

from bench.extract_profile import categorize, profile_counts

MAIN = "thread (1): MainThread;<module> (cli.py:1);run_extraction (extract/job.py:300)"
LOOP = MAIN + ";_compute (extract/job.py:480);extract_segments (extract/job.py:202)"
STREAMS = LOOP + ";run_in_streams (extract/streams.py:70)"


def test_main_thread_samples_inside_the_loop():
    assert categorize(STREAMS + ";_features_of (extract/job.py:210);Session.run (ort.py:1)") == \
        "loop: inference in this thread"
    assert categorize(STREAMS + ";result (concurrent/futures/_base.py:451);wait (threading.py:1)") == \
        "loop: waiting for the inference streams"
    assert categorize(STREAMS + ";decoded_batches (extract/job.py:180);result (concurrent/futures/_base.py:451)") == \
        "loop: waiting for decoded images"
    assert categorize(STREAMS + ";decoded_batches (extract/job.py:185);stack (numpy/shape_base.py:1)") == \
        "loop: stacking decoded images"
    assert categorize(LOOP + ";BackgroundSegments.add (extract/segments.py:50)") == \
        "loop: handing rows to the segment writer"
    assert categorize(MAIN + ";_compute (extract/job.py:490);commit (extract/store_writer.py:211)") == \
        "loop: checkpoints"


def test_main_thread_samples_outside_the_loop_and_other_threads():
    assert categorize(MAIN + ";_scan (extract/job.py:400);_hash_entries (extract/job.py:120)") == \
        "outside the loop: scan and hashing"
    assert categorize("thread (1): MainThread;<module> (cli.py:3);_find_and_load (<frozen importlib>:1)") == \
        "outside the loop: imports"
    assert categorize("thread (1): MainThread").startswith("outside the loop: no Python frame")
    worker = "thread (2): ThreadPoolExecutor-1_0;_bootstrap (threading.py:1);_worker (concurrent/futures/thread.py:83)"
    assert categorize(worker + ";_decode (extract/job.py:153);decode_image (edge/imageio.py:338)") == \
        "decode threads: decoding"
    assert categorize(worker + ";_features_of (extract/job.py:210);Session.run (ort.py:1)") == \
        "inference streams: computing"
    assert categorize(worker + ";get (queue.py:171)") is None  # a pool thread waiting for work


def test_profile_counts_adds_the_samples_of_each_category():
    raw = "\n".join([f"{LOOP};BackgroundSegments.add (extract/segments.py:50) 3",
                     f"{STREAMS};_features_of (extract/job.py:210);Session.run (ort.py:1) 5",
                     f"{STREAMS};_features_of (extract/job.py:210);Session.run (ort.py:2) 2",
                     "thread (2): ThreadPoolExecutor-1_0;get (queue.py:171) 9"])
    assert profile_counts(raw) == {"loop: handing rows to the segment writer": 3, "loop: inference in this thread": 7}
