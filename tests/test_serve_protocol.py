"""Wire messages, serve settings, and the executor loop with a stand-in engine (no model)."""

from __future__ import annotations

import pickle

import msgspec
import pytest
import zmq

from parallax.config import ConfigError, ExecutorConfig, ServeConfig, parse_size
from parallax.engine.engine import StepOutput
from parallax.engine.sampling_params import SamplingParams
from parallax.node.executor import ExecutorLoop
from parallax.protocol.common import ENGINE_ERROR, INVALID_REQUEST, TokenOutput, encode
from parallax.protocol.ipc import (
    AbortRequest,
    AddRequest,
    ExecutorError,
    ExecutorProgress,
    ExecutorStats,
    Shutdown,
    StepOutputs,
    decode_from_executor,
    decode_to_executor,
)


def test_messages_round_trip_both_directions():
    to_executor = [
        AddRequest("r1", [1, 2, 3], SamplingParams(temperature=0.5, seed=7, max_tokens=9,
                                                   stop_token_ids=(2,))),
        AbortRequest(["r1", "r2"]),
        Shutdown(),
    ]
    for message in to_executor:
        assert decode_to_executor(encode(message)) == message
    stats = ExecutorStats(1, 2, 3, 4)
    from_executor = [
        ExecutorProgress("loading"),
        StepOutputs([TokenOutput("r1", 5), TokenOutput("r2", None, True, "error", "x")],
                    stats),
        ExecutorError(12, "died", "Traceback ...", during_startup=True),
    ]
    for message in from_executor:
        assert decode_from_executor(encode(message)) == message


def test_decoders_reject_foreign_and_pickled_payloads():
    with pytest.raises(msgspec.ValidationError):  # a frontend-bound message sent the wrong way
        decode_to_executor(encode(ExecutorProgress("x")))
    with pytest.raises((msgspec.DecodeError, msgspec.ValidationError)):
        decode_to_executor(pickle.dumps({"type": "add"}))


@pytest.mark.parametrize("text,expected", [
    ("2GB", 2 * 2**30), ("512MB", 512 * 2**20), ("1.5", int(1.5 * 2**30)),
    ("300m", 300 * 2**20), ("64KiB", 64 * 2**10), ("2 GiB", 2 * 2**30),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_serve_config_validates_and_resolves_dtype():
    assert ServeConfig().executor.dtype == "float32"
    assert ServeConfig(device="cuda").executor.dtype == "bfloat16"
    assert ServeConfig(dtype="bfloat16").executor.dtype == "bfloat16"
    assert ServeConfig(max_batch_size=4, max_waiting=2).max_in_flight == 6
    for bad in [dict(port=70000), dict(device="tpu"), dict(dtype="int3"),
                dict(max_batch_size=0), dict(max_waiting=-1), dict(threads=0)]:
        with pytest.raises(ConfigError):
            ServeConfig(**bad)
    config = ExecutorConfig(model="m", kv_memory_bytes=2**20)
    assert msgspec.json.decode(msgspec.json.encode(config), type=ExecutorConfig) == config


class StubEngine:
    """Enough of Engine for the loop: add/abort/step with scripted failures."""

    def __init__(self) -> None:
        self.sequences: dict[str, int] = {}
        self.fail_next_step = False

    def add_request(self, rid, prompt, params, num_resumed_tokens=0):
        if not prompt:
            raise ValueError("the prompt has no tokens")
        self.sequences[rid] = 0

    def abort(self, rid):
        return self.sequences.pop(rid, None) is not None

    def has_work(self):
        return bool(self.sequences)

    def step(self):
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("kernel exploded")
        outputs = []
        for rid in list(self.sequences):
            self.sequences[rid] += 1
            done = self.sequences[rid] == 2
            outputs.append(StepOutput(rid, token_id=10 + self.sequences[rid], finished=done,
                                      finish_reason="length" if done else None))
            if done:
                del self.sequences[rid]
        return outputs

    num_running = property(lambda self: len(self.sequences))
    num_waiting = 0
    num_free_blocks = 8
    num_total_blocks = 8


@pytest.fixture
def loop_sockets():
    ctx = zmq.Context()
    front_push, loop_pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    loop_push, front_pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    loop_pull.bind("inproc://in")
    front_push.connect("inproc://in")
    front_pull.bind("inproc://out")
    loop_push.connect("inproc://out")
    yield front_push, loop_pull, loop_push, front_pull
    for s in (front_push, loop_pull, loop_push, front_pull):
        s.close(0)
    ctx.term()


def _collect(front_pull) -> list[TokenOutput]:
    outputs = []
    while front_pull.poll(0):
        message = decode_from_executor(front_pull.recv())
        outputs.extend(message.outputs)
    return outputs


def test_executor_loop_isolates_bad_requests_and_failed_steps(loop_sockets):
    front_push, loop_pull, loop_push, front_pull = loop_sockets
    engine = StubEngine()
    loop = ExecutorLoop(engine, loop_pull, loop_push)
    params = SamplingParams()
    for message in [AddRequest("good", [1], params), AddRequest("bad", [], params)]:
        front_push.send(encode(message))
    loop.run_once(idle_timeout_ms=100)  # drains both, steps "good" once
    outputs = _collect(front_pull)
    assert TokenOutput("bad", None, True, "error", "the prompt has no tokens",
                       INVALID_REQUEST) in outputs  # never replayed
    assert TokenOutput("good", 11) in outputs  # a bad neighbour did not stop it

    engine.fail_next_step = True
    front_push.send(encode(AddRequest("other", [1], params)))
    loop.run_once(idle_timeout_ms=100)
    failed = _collect(front_pull)
    assert {o.rid for o in failed} == {"good", "other"}
    assert all(o.finish_reason == "error" and "kernel exploded" in o.error for o in failed)
    assert all(o.kind == ENGINE_ERROR for o in failed)
    assert not engine.sequences  # the process goes on with a clean engine


def test_executor_loop_abort_publishes_fresh_stats(loop_sockets):
    front_push, loop_pull, loop_push, front_pull = loop_sockets
    engine = StubEngine()
    engine.sequences["r"] = 0
    loop = ExecutorLoop(engine, loop_pull, loop_push)
    front_push.send(encode(AbortRequest(["r"])))
    front_push.send(encode(Shutdown()))
    loop.run()  # stops on Shutdown after publishing the abort's stats
    assert not loop.running
    message = decode_from_executor(front_pull.recv())
    assert message.stats == ExecutorStats(0, 0, 8, 8)


def test_executor_loop_fails_only_the_batch_whose_forward_failed(loop_sockets):
    """A StepFailed names the batch's requests: those fail, the others keep decoding."""
    from parallax.engine.engine import StepFailed

    front_push, loop_pull, loop_push, front_pull = loop_sockets
    engine = StubEngine()
    loop = ExecutorLoop(engine, loop_pull, loop_push)
    for rid in ("a", "b"):
        engine.sequences[rid] = 0
    real_step = engine.step

    def step():
        engine.step = real_step
        raise StepFailed(["b"], RuntimeError("fp16 overflow in this batch"))

    engine.step = step
    loop.run_once(idle_timeout_ms=0)
    failed = _collect(front_pull)
    assert [(o.rid, o.finish_reason) for o in failed] == [("b", "error")]
    assert "fp16 overflow" in failed[0].error
    loop.run_once(idle_timeout_ms=0)
    assert TokenOutput("a", 11) in _collect(front_pull)  # "a" goes on


class RecordingStage:
    """Stands in for StageRouter: records what a later stage hands it after a step."""

    def __init__(self) -> None:
        self.after = []

    def after_step(self, outputs):
        self.after.extend(outputs)
        return []  # a later stage sends errors to each request's head, not to its frontend

    def check_peers(self):
        return []


def test_failures_on_a_later_stage_go_to_the_head_not_the_local_frontend(loop_sockets):
    """The last stage samples: when its step fails, the heads must hear (before, the errors
    went to the last node's own frontend, which never had those requests, and the client
    waited forever)."""
    _, loop_pull, loop_push, front_pull = loop_sockets
    engine = StubEngine()
    engine.is_first = False
    engine.sequences.update({"x": 0, "y": 0})
    engine.fail_next_step = True
    loop = ExecutorLoop(engine, loop_pull, loop_push)
    loop.stage = RecordingStage()
    loop.run_once(idle_timeout_ms=0)
    assert {(o.request_id, o.finish_reason) for o in loop.stage.after} == {
        ("x", "error"), ("y", "error")}
    assert all("kernel exploded" in o.error for o in loop.stage.after)
    assert not engine.sequences
    assert _collect(front_pull) == []  # stats only, no outputs for the local frontend
