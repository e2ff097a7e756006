"""Task http (issue 16, item 1): rewards from the user's own HTTP verifier, a real local process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from runtime_server import free_port, running_runtime_server, wait_for
from verifier_server import reward, running_verifier, seen

from clora.api.experiment_types import Verifier
from clora_runtime.tasks.verifier import Item, VerifierError, rewards_from, score, shown

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def verifier() -> Iterator[tuple[str, str]]:
    """(base URL, token) of a running tests/verifier_server.py."""
    with running_verifier() as running:
        yield running


ITEMS = [Item("1+1?", "2", "2"), Item("1+2?", "it is 3", "3", {"id": 7})]
EXPERIMENT = {"namespace": "ns", "name": "x", "step": 0}


def test_rewards_from_checks_the_answer() -> None:
    assert rewards_from({"rewards": [1, 0.5]}, 2) == [1.0, 0.5]
    for answer, words in [
        ([1, 2], "not an object"),
        ({"rewards": [1]}, "1 rewards for 2 items"),
        ({"rewards": [1, "a"]}, "rewards[1] is 'a'"),
        ({"rewards": [1, True]}, "rewards[1] is True"),
        ({"rewards": [float("nan"), 1]}, "rewards[0] is nan"),
        ({"rewards": [1, float("inf")]}, "not a finite number"),
    ]:
        with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
            rewards_from(answer, 2)


def test_shown_urls_drop_what_may_be_secret() -> None:
    assert (
        shown("https://user:pw@verifier.example:8443/score?key=s3cret")
        == "https://verifier.example:8443/score"
    )


def test_score_retries_5xx_and_names_the_url(verifier: tuple[str, str]) -> None:
    url, token = verifier
    naps: list[float] = []
    got = score(Verifier(url=f"{url}/flaky", retries=2), token, EXPERIMENT, ITEMS, sleep=naps.append)
    assert got == [reward("2"), reward("it is 3")] and naps == [0.5, 1.0]  # two 503s, then an answer
    flaky = seen(url)["/flaky"]
    assert flaky["posts"] == 3 and flaky["last"] == {"experiment": EXPERIMENT, "items": 2}
    with pytest.raises(VerifierError, match=rf"verifier {url}/score refused the step: HTTP 401"):
        score(Verifier(url=f"{url}/score"), "wrong", EXPERIMENT, ITEMS, sleep=naps.append)
    with pytest.raises(VerifierError, match=r"failed 2 times: no answer within timeoutSeconds 0.3"):
        score(
            Verifier(url=f"{url}/slow", timeoutSeconds=0.3, retries=1),
            token,
            EXPERIMENT,
            ITEMS,
            sleep=naps.append,
        )
    with pytest.raises(VerifierError, match=r"malformed body: 1 rewards for 2 items"):
        score(Verifier(url=f"{url}/short"), token, EXPERIMENT, ITEMS)
    with pytest.raises(VerifierError, match=r"cannot connect"):
        score(Verifier(url=f"http://127.0.0.1:{free_port()}/x", retries=0), token, EXPERIMENT, ITEMS)


def http_spec(url: str, **verifier: Any) -> dict[str, Any]:
    return {
        "runtime": "local",
        "task": {"name": "http", "verifier": {"url": url, "tokenSecret": {"name": "v"}, **verifier}},
        "lora": {"rank": 4, "alpha": 8},
        "training": {
            "steps": 1000,
            "learningRate": 1e-3,
            "promptsPerStep": 2,
            "groupSize": 2,
            "maxNewTokens": 6,
        },
    }


def test_verifier_rewards_train_and_a_broken_verifier_fails_only_its_experiment(
    verifier: tuple[str, str], tmp_path: Path
) -> None:
    url, token = verifier
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "Say a word.", "metadata": {"id": 1}}\n{"prompt": "Say two words."}\n')
    good = {**http_spec(f"{url}/score")}
    good["task"]["dataset"] = {"path": str(data)}
    slow = http_spec(f"{url}/slow", timeoutSeconds=0.5, retries=1)
    slow["task"]["dataset"] = {"path": str(data)}
    short = http_spec(f"{url}/short")
    short["task"]["dataset"] = {"path": str(data)}
    plain = {**http_spec(""), "task": {"name": "arithmetic"}}
    with running_runtime_server(tmp_path / "runs") as server, server.client() as api:
        for name, spec in (("good", good), ("slow", slow), ("short", short), ("plain", plain)):
            r = api.put(f"/v1/experiments/ns/{name}", json={"spec": spec, "verifierToken": token})
            assert r.status_code == 200, r.text
        state = lambda name: api.get(f"/v1/experiments/ns/{name}").json()  # noqa: E731
        failed = {
            name: wait_for(
                lambda name=name: (s := state(name))["phase"] == "Failed" and s, what=f"{name} failed"
            )
            for name in ("slow", "short")
        }
        assert (
            f"verifier {url}/slow failed 2 times: no answer within timeoutSeconds 0.5"
            in failed["slow"]["message"]
        )
        assert (
            f"verifier {url}/short answered a malformed body: 3 rewards for 4 items"
            in failed["short"]["message"]
        )
        # The good one and the plain neighbour keep stepping after both failures.
        steps = {n: state(n)["step"] for n in ("good", "plain")}
        wait_for(lambda: all(state(n)["step"] >= steps[n] + 2 for n in steps), what="neighbours stepping")
        # Its rewards are the verifier's, completion by completion, and it learns from them.
        rollouts = api.get("/v1/experiments/ns/good/rollouts").json()["rollouts"]
        assert rollouts and all(r["reward"] == reward(r["completion"]) for r in rollouts)
        assert state("good")["phase"] == "Running" and state("good")["stats"]["gradNorm"] >= 0
        last = seen(url)["/score"]["last"]
        assert last["items"] == 4 and last["experiment"]["name"] == "good"
        # The token is in no answer, no metric and no log line.
        listing = api.get("/v1/experiments").text
        metrics = api.get("/metrics").text
        openapi = api.get("/openapi.json").text
    for text in (listing, metrics, openapi, server.log()):
        assert token not in text


def test_bench_verifier_compares_both_arms() -> None:
    """The benchmark's plumbing on a short run (its figures come from scripts/bench.sh)."""
    from clora_runtime.bench.verifier import verifier_bench

    r = verifier_bench(experiments=2, ticks=2, rounds=1)
    assert set(r["experiments"]) == {"1", "2"}
    for e in r["experiments"].values():
        assert e["builtinRewardSeconds"]["mean"] > 0 and e["verifierRewardSeconds"]["mean"] > 0
