"""The worker's engine thread: stop() returns only once the thread is done, so that whoever
closes the engine and its publisher next never races a step still running."""

from __future__ import annotations

import asyncio
import threading

from kvgrid.engine.llm_engine import LLMEngine
from kvgrid.engine.sampling_params import SamplingParams
from kvgrid.server.engine_loop import EngineLoop


def test_stop_waits_for_the_running_step(tiny_model_dir):
    engine = LLMEngine(model=str(tiny_model_dir("llama")), block_size=16, num_kv_blocks=64)
    in_step, release = threading.Event(), threading.Event()
    inner = engine.step

    def slow_step():
        in_step.set()
        release.wait(5)
        return inner()

    engine.step = slow_step
    loop = EngineLoop(engine, "w0", "epoch")
    loop.start()
    outs: list = []
    asyncio.run(
        loop.add_request(
            "r", [5, 6, 7], SamplingParams(max_tokens=50, ignore_eos=True), b"", outs.append
        )
    )
    assert in_step.wait(5), "the loop never stepped"
    stopper = threading.Thread(target=loop.stop)
    stopper.start()
    stopper.join(0.3)
    assert stopper.is_alive(), "stop() returned while a step was still running"
    release.set()
    stopper.join(5)
    assert not stopper.is_alive() and not loop.is_alive()
    assert loop.failed is None


def test_the_loop_warms_its_own_thread_before_stepping(tiny_model_dir):
    """cuDNN keeps its attention plans per thread: the warm-up must run on the loop's
    thread (not the one that built the engine), and before the first step."""
    engine = LLMEngine(model=str(tiny_model_dir("llama")), block_size=16, num_kv_blocks=64)
    events: list[tuple[str, int]] = []
    warm, step = engine.warm_thread, engine.step
    engine.warm_thread = lambda: (events.append(("warm", threading.get_ident())), warm())
    engine.step = lambda: (events.append(("step", threading.get_ident())), step())[1]
    loop = EngineLoop(engine, "w0", "epoch")
    loop.start()
    outs: list = []
    asyncio.run(loop.add_request("r", [5, 6, 7], SamplingParams(max_tokens=2), b"", outs.append))
    loop.stop()
    assert loop.failed is None
    assert events[0] == ("warm", loop.ident)
    assert [e for e in events if e[0] == "warm"] == [("warm", loop.ident)]
    assert ("step", loop.ident) in events
