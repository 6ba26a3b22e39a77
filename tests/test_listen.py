"""Human preferences (eval.listen, eval.listen_app): the blind A/B page driven in headless Chromium
against a real server process (kill -9 and resume included), the request-safety rules, the
statistics against hand-computed numbers, and judgments -> (chosen, rejected) token pairs."""
import http.client
import json
import math
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from eval import listen
from eval.listen_app import main as listen_main
from models.io import atomic_write_text, write_jsonl

from .conftest import REPO

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
HOSTILE = 'Mind the <script>window.__pwned = 1</script> & <b>bold</b> "quotes"'
SR = 16000


# ---------------------------------------------------------------------------------------------
# a fake run directory: rows.jsonl per round and short WAVs (no training loop)
# ---------------------------------------------------------------------------------------------
def _tone(path: Path, freq: float, seconds: float = 0.6, seed: int = 0) -> None:
    t = np.arange(int(seconds * SR)) / SR
    noise = np.random.default_rng(seed).normal(0, 0.01, t.size)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, (0.2 * np.sin(2 * np.pi * freq * t) + noise).astype(np.float32), SR)


def _codes(i: int, k: int) -> list[int]:
    return [(7 * i + 3 * k + j) % 50 for j in range(5 + i % 3 + k)]


def make_run(root: Path, name: str = "run_a", rounds=(0, 1), n: int = 9) -> Path:
    """utt00..utt06 saved in every round (7 items for rounds 0,1); utt07 not saved in round 1;
    utt08's saved_audio points outside the run (must be ignored). utt02 and utt05 carry markup."""
    run = root / name
    atomic_write_text(run / "config.yaml", "name: fake\n")
    write_jsonl(run / "metrics.jsonl", [{"round": k} for k in rounds])
    for i in range(n):
        _tone(root / "corpus" / f"utt{i:02d}.wav", 200 + 20 * i, seed=i)
    for k in rounds:
        rows = []
        for i in range(n):
            uid = f"utt{i:02d}"
            saved = f"audio/{uid}.wav"
            if i == 7 and k == rounds[-1]:
                saved = None
            if i == 8:
                saved = "../../../../../../etc/passwd"
            if saved == f"audio/{uid}.wav":
                _tone(run / f"round_{k:03d}" / "eval" / saved, 300 + 40 * i + 100 * k, seed=100 * k + i)
            rows.append({"id": uid, "text": HOSTILE if i in (2, 5) else f"Sentence number {i} is spoken here.",
                         "speaker": f"spk{i % 2}", "audio": str(root / "corpus" / f"{uid}.wav"),
                         "prompt_audio": str(root / "corpus" / f"{uid}.wav"), "round": k, "wer": 0.1, "sim": 0.8,
                         "saved_audio": saved, "codes": _codes(i, k), "prompt_id": f"p{i}"})
        write_jsonl(run / f"round_{k:03d}" / "eval" / "rows.jsonl", rows)
    return run


def test_items_pair_rounds_with_saved_audio_only(tmp_path):
    run = make_run(tmp_path)
    items = listen.build_items([str(run)], [0, 1])
    assert sorted(it.utt_id for it in items) == [f"utt{i:02d}" for i in range(7)]
    assert all(it.x.label == "run_a:r0" and it.y.label == "run_a:r1" for it in items)
    assert all(Path(it.clip_x).is_relative_to(run) and it.reference.endswith(f"{it.utt_id}.wav") for it in items)
    assert len({it.item_id for it in items}) == 7
    # default for one run: first and last evaluated round; a missing round is an error naming the rounds
    assert [s.round for s in listen.choose_systems([str(run)])] == [0, 1]
    with pytest.raises(ValueError, match=r"evaluated rounds: \[0, 1\]"):
        listen.build_items([str(run)], [0, 3])
    # the per-rater order and sides are seeded: the same for a rater, different between raters
    assert listen.rater_order(items, "alice") == listen.rater_order(items, "alice")
    assert listen.rater_order(items, "alice") != listen.rater_order(items, "bob")
    # several runs: compared within a round; items and their x do not depend on the order runs are given in
    other = make_run(tmp_path, "run_b")
    ab, ba = listen.build_items([str(run), str(other)]), listen.build_items([str(other), str(run)])
    assert [(it.item_id, it.x.label, it.y.label) for it in ab] == [(it.item_id, it.x.label, it.y.label) for it in ba]
    assert {(it.x.label, it.y.label) for it in ab} == {("run_a:r1", "run_b:r1")} and len(ab) == 7


# ---------------------------------------------------------------------------------------------
# the page in headless Chromium against a server process
# ---------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(run: Path, port: int, log_path: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log = open(log_path, "ab")
    proc = subprocess.Popen([sys.executable, "-m", "eval.listen_app", str(run), "--rounds", "0,1", "--port", str(port)],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    deadline = time.time() + 30
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"listen server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            status, body = _request(port, "GET", "/healthz")
            if status == 200:
                assert body == {"ok": True, "items": 7}
                return proc
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"listen server did not answer within 30 s:\n{log_path.read_text()[-3000:]}")


def _request(port: int, method: str, path: str, body=None, content_type: str = "application/json"):
    """A raw HTTP request: the path goes out exactly as written (no client-side normalisation)."""
    con = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        data = None if body is None else (body if isinstance(body, (str, bytes)) else json.dumps(body))
        con.request(method, path, body=data, headers={"Content-Type": content_type} if data is not None else {})
        resp = con.getresponse()
        raw = resp.read()
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, raw
    finally:
        con.close()


def _judgments(db: Path) -> list[dict]:
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute("SELECT * FROM judgments ORDER BY id")]
    finally:
        con.close()


def _progress(page, position: int, done: int, total: int = 7) -> None:
    want = f"Item {position} of {total} ({done} judged)"
    page.wait_for_function("w => document.getElementById('progress-text').textContent === w", arg=want, timeout=10_000)


def _hear(page, side: str, key: bool) -> None:
    """Play one clip (button or space bar) and wait until the server counted it as heard."""
    if key:
        page.keyboard.press(" ")
    else:
        page.click(f"#play-{side}")
    page.wait_for_selector(f"#heard-{side}[data-played='1']", timeout=10_000)


def _check_text(page, seen: list[str]) -> None:
    text = page.text_content("#text")
    assert page.evaluate("document.getElementById('text').children.length") == 0  # markup stayed text
    assert page.evaluate("typeof window.__pwned") == "undefined"
    seen.append(text)


def test_listening_page_votes_resume_after_kill_and_refuses_bad_requests(tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"Chromium not found at {CHROMIUM}: apt-get install -y chromium (scripts/setup.sh does it)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: pip install playwright (no `playwright install` needed, "
                    "the test drives Debian's Chromium)")
    run = make_run(tmp_path)
    db = run / "listen" / "judgments.sqlite"  # the default place
    port, log_path = _free_port(), tmp_path / "server.log"
    base = f"http://127.0.0.1:{port}"
    shot = (REPO / "docs" / "listen.png") if os.environ.get("SPEECHALIGN_WRITE_SCREENSHOT") == "1" \
        else tmp_path / "listen.png"
    server = _start_server(run, port, log_path)
    try:
        with sync_playwright() as pw:
            ctx = pw.chromium.launch_persistent_context(
                str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
                viewport={"width": 1000, "height": 700})
            page = ctx.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            # a CSP violation (a style or script the nonce does not cover) is a console error, not a page error
            page.on("console", lambda m: errors.append(m.text) if "Content Security Policy" in m.text else None)
            page.goto(base + "/")
            page.fill("#rater-name", "alice")
            page.click("#start")
            _progress(page, 1, 0)
            seen: list[str] = []

            # a vote before both clips were heard: the page says so, and the server refuses it too
            assert page.is_disabled("#vote-A")
            page.keyboard.press("1")
            assert "Play both" in page.text_content("#status")
            first = _request(port, "GET", "/api/next?rater=alice")[1]["item"]["id"]
            status, body = _request(port, "POST", "/api/vote", {"rater": "alice", "item": first, "choice": "A"})
            assert status == 409 and body["reason"] == "not_played" and "play both" in body["error"]
            _hear(page, "A", key=False)
            status, body = _request(port, "POST", "/api/vote", {"rater": "alice", "item": first, "choice": "A"})
            assert status == 409 and "not heard yet: B" in body["error"]
            assert _judgments(db) == []

            for n, vote_key in enumerate(["1", "2", "3", "a", "b"]):
                _progress(page, n + 1, n)
                _check_text(page, seen)
                if n == 0:
                    _hear(page, "B", key=False)
                    page.check("input[name=qmos_a][value='4']")
                    page.check("input[name=smos_b][value='2']")
                    page.keyboard.press("r")  # the reference recording plays too
                    page.wait_for_function("() => document.getElementById('audio-ref').currentTime > 0.3", timeout=10_000)
                    page.screenshot(path=str(shot))
                else:
                    _hear(page, "A", key=True)  # space plays A, then B
                    _hear(page, "B", key=True)
                page.keyboard.press(vote_key)
                _progress(page, n + 2, n + 1)
            page.reload()
            _progress(page, 6, 5)
            rows = _judgments(db)
            assert len(rows) == 5 and {r["rater"] for r in rows} == {"alice"} and rows[0]["item"] == first
            assert [r["choice"] for r in rows] == ["A", "B", "same", "A", "B"]
            assert (rows[0]["qmos_a"], rows[0]["smos_b"], rows[0]["qmos_b"], rows[0]["smos_a"]) == (4, 2, None, None)
            for r in rows:  # the order shown is stored and the winner is the system on the chosen side
                assert {r["system_a"], r["system_b"]} == {"run_a:r0", "run_a:r1"}
                assert r["order_shown"] == ("XY" if r["system_a"] == "run_a:r0" else "YX")
                assert r["winner"] == {"A": r["system_a"], "B": r["system_b"], "same": None}[r["choice"]]
            assert {r["order_shown"] for r in rows} == {"XY", "YX"}  # sides are shuffled

            # kill -9 mid-session (clip A of item 6 playing), restart: nothing lost, resume at item 6
            page.click("#play-A")
            server.send_signal(signal.SIGKILL)
            server.wait(10)
            server = _start_server(run, port, log_path)
            page.reload()
            _progress(page, 6, 5)
            assert len(_judgments(db)) == 5
            _check_text(page, seen)

            # nothing but opaque clip ids names a file
            for path in ["/audio/../../etc/passwd", "/audio/%2e%2e/%2e%2e/etc/passwd", "/audio/..%2f..%2fetc%2fpasswd",
                         "/audio/%252e%252e/etc/passwd", "/audio//etc/passwd", "/audio/%2Fetc%2Fpasswd",
                         "/audio/etc/passwd", f"/audio/{tmp_path}/corpus/utt00.wav", "/audio/utt00.wav",
                         "/audio/0123456789abcdef", "/../../etc/passwd"]:
                status, body = _request(port, "GET", path)
                assert 400 <= status < 500 and isinstance(body, dict) and body["error"], (path, status, body)
            for player in ("#audio-A", "#audio-ref"):
                status, wav = _request(port, "GET", page.get_attribute(player, "src"))
                assert status == 200 and wav[:4] == b"RIFF"

            # malformed requests: a 4xx JSON with a message
            item6 = _request(port, "GET", "/api/next?rater=alice")[1]["item"]["id"]
            bad = [("POST", "/api/vote", "choice=A", "application/x-www-form-urlencoded", 415),
                   ("POST", "/api/vote", "{not json", "application/json", 400),
                   ("POST", "/api/vote", [1, 2], "application/json", 400),
                   ("POST", "/api/vote", {"rater": "alice", "item": item6, "choice": "C"}, "application/json", 400),
                   ("POST", "/api/vote", {"rater": "alice", "item": item6, "choice": "A", "qmos_a": 7},
                    "application/json", 400),
                   ("POST", "/api/vote", {"rater": "alice", "item": "f" * 16, "choice": "A"}, "application/json", 404),
                   ("POST", "/api/vote", {"rater": "", "item": item6, "choice": "A"}, "application/json", 400),
                   ("POST", "/api/played", {"rater": "alice", "item": item6, "side": "C"}, "application/json", 400),
                   ("POST", "/api/played", {"rater": "alice", "item": item6, "side": "A", "seconds": "x"},
                    "application/json", 400),
                   ("GET", "/api/next", None, "application/json", 400),
                   ("GET", "/nope", None, "application/json", 404),
                   ("DELETE", "/api/vote", None, "application/json", 405)]
            for method, path, payload, ctype, want in bad:
                status, body = _request(port, method, path, payload, ctype)
                assert status == want and isinstance(body, dict) and body["error"], (method, path, payload, status, body)

            # a double submit (two requests at once) stores one judgment
            _hear(page, "A", key=False)
            _hear(page, "B", key=False)
            statuses = page.evaluate("""async (vote) => {
                const send = () => fetch('/api/vote', {method: 'POST', headers: {'Content-Type': 'application/json'},
                                                       body: JSON.stringify(vote)}).then(r => r.status);
                return Promise.all([send(), send()]);
            }""", {"rater": "alice", "item": item6, "choice": "B"})
            assert sorted(statuses) == [200, 409]
            rows = _judgments(db)
            assert len(rows) == 6 and len({r["item"] for r in rows}) == 6
            page.reload()
            _progress(page, 7, 6)
            _check_text(page, seen)
            _hear(page, "A", key=True)
            _hear(page, "B", key=True)
            page.keyboard.press("s")
            page.wait_for_selector("#finished:not([hidden])", timeout=10_000)
            assert page.text_content("#progress-text") == "All 7 items judged" and len(_judgments(db)) == 7

            # markup in a text is shown as text (2 of the 7 items carry it; 7 were shown)
            assert HOSTILE in seen and set(seen) <= {HOSTILE} | {f"Sentence number {i} is spoken here." for i in range(7)}
            assert not errors, errors
            ctx.close()
    finally:
        server.kill()
        server.wait(10)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and 10_000 < shot.stat().st_size < 400_000
    # the results command reads the database the page filled
    assert listen_main(["--results", str(run)]) == 0
    md = (run / "listen" / "results.md").read_text()
    assert "run_a:r0" in md and "Wilson" in md and "7 judgments by 1 rater(s) on 7 item(s)" in md


# ---------------------------------------------------------------------------------------------
# statistics against hand-computed numbers
# ---------------------------------------------------------------------------------------------
X, Y = ("run_a:r0", "/runs/run_a", 0), ("run_a:r1", "/runs/run_a", 1)


def _judgment(rater: str, item: str, outcome: str, order: str = "XY", x=X, y=Y, **scores) -> dict:
    """A judgment row for item ``item`` of systems x (the item's first) and y; ``outcome``: x, y or same."""
    a, b = (x, y) if order == "XY" else (y, x)
    choice = "same" if outcome == "same" else ("A" if (outcome == "x") == (order == "XY") else "B")
    return {"rater": rater, "item": item, "utt_id": f"u{item[1:]}", "system_a": a[0], "run_a": a[1], "round_a": a[2],
            "system_b": b[0], "run_b": b[1], "round_b": b[2], "order_shown": order, "choice": choice,
            "winner": None if choice == "same" else (a if choice == "A" else b)[0],
            **{k: scores.get(k) for k in ("qmos_a", "qmos_b", "smos_a", "smos_b")}}


def test_wilson_interval_matches_hand_computed_values():
    # 7/10: centre (0.7 + z^2/20) / (1 + z^2/10), half-width z/(1 + z^2/10) sqrt(0.021 + z^2/400)
    assert listen.wilson_interval(7, 10) == pytest.approx((0.39678, 0.89221), abs=1e-5)
    assert listen.wilson_interval(0, 5) == pytest.approx((0.0, 0.43448), abs=1e-5)
    assert listen.wilson_interval(5, 5)[1] == 1.0 and all(math.isnan(v) for v in listen.wilson_interval(0, 0))


def test_kappas_match_hand_computed_values():
    # p_o = 4/5; marginals (X .4 .2, Y .4 .6, S .2 .2) -> p_e = .36; kappa = .44 / .64
    assert listen.cohen_kappa(list("XXYYS"), list("XYYYS")) == pytest.approx(0.6875)
    # P_i = 1, 0, 1, 1, 1 -> P_bar .8; p_j = (.3, .5, .2) -> P_e = .38; kappa = .42 / .62
    counts = [{"X": 2}, {"X": 1, "Y": 1}, {"Y": 2}, {"Y": 2}, {"S": 2}]
    assert listen.fleiss_kappa(counts) == pytest.approx(0.42 / 0.62)
    assert math.isnan(listen.cohen_kappa(["X"], ["X"]))  # chance agreement 1: undefined, not 1


def test_results_win_rates_mos_and_agreement(tmp_path):
    store = listen.Store(tmp_path / "j.sqlite")
    alice = ["x", "x", "y", "y", "same", "y", "y", "y", "x", "same"]
    bob = ["x", "y", "y", "y", "same"]
    for i, o in enumerate(alice):  # sides alternate, so the canonicalisation is exercised
        store.add_judgment(_judgment("alice", f"i{i}", o, "XY" if i % 2 else "YX"))
    for i, o in enumerate(bob):
        store.add_judgment(_judgment("bob", f"i{i}", o, "XY"))
    store.add_judgment(_judgment("<i>carol</i>", "i0", "x", "YX"))
    # scores: X gets QMOS 4 (A of an XY), 5 and 3 (B of YX items); Y gets SMOS 2 and 4
    store.add_judgment(_judgment("dave", "j0", "x", "XY", qmos_a=4, smos_b=2))
    store.add_judgment(_judgment("dave", "j1", "y", "YX", qmos_b=5, smos_a=4))
    store.add_judgment(_judgment("dave", "j2", "same", "YX", qmos_b=3))
    assert not store.add_judgment(_judgment("dave", "j2", "x", "XY"))  # one judgment per rater and item
    res = listen.compute_results(store.judgments())

    # X wins: alice 3, bob 1, carol 1, dave 1 = 6; Y wins: alice 5 + bob 3 + dave 1 = 9; ties 2 + 1 + 1 = 4
    (pair,) = res.pairs
    assert (pair["system_x"], pair["system_y"], pair["n"], pair["x_wins"], pair["y_wins"], pair["ties"]) == \
        ("run_a:r0", "run_a:r1", 19, 6, 9, 4)
    assert pair["x_win_rate"] == pytest.approx(6 / 15) and pair["tie_rate"] == pytest.approx(4 / 19)
    assert pair["x_score"] == pytest.approx(8 / 19)
    # Wilson 6/15: p = .4, z^2/n = .25610; centre .52805 / 1.25610 = .42039, half 1.56036 sqrt(.016 + .0042683)
    assert (pair["x_win_lo"], pair["x_win_hi"]) == pytest.approx((0.19824, 0.64253), abs=1e-5)

    scores = {r["system"]: r for r in res.scores}
    # QMOS of X: 4, 5, 3 -> mean 4, sd 1, t(.975, 2) = 4.30265 -> 4 -/+ 2.48414
    assert (scores["run_a:r0"]["qmos_mean"], scores["run_a:r0"]["qmos_lo"], scores["run_a:r0"]["qmos_hi"]) == \
        pytest.approx((4.0, 1.51586, 6.48414), abs=1e-5)
    # SMOS of Y: 2, 4 -> mean 3, sd sqrt 2, t(.975, 1) = 12.7062 -> 3 -/+ 12.7062
    assert (scores["run_a:r1"]["smos_mean"], scores["run_a:r1"]["smos_hi"]) == pytest.approx((3.0, 15.7062), abs=1e-4)
    assert scores["run_a:r1"]["qmos_n"] == 0 and math.isnan(scores["run_a:r1"]["qmos_mean"])

    agree = {r["raters"]: r for r in res.agreement}
    ab = agree["alice & bob"]  # i0..i4: x x y y same vs x y y y same
    assert (ab["n_items"], ab["percent_agreement"], ab["kappa"]) == (5, 0.8, pytest.approx(0.6875))
    assert agree["<i>carol</i> & alice"]["percent_agreement"] == 1.0 and math.isnan(agree["<i>carol</i> & alice"]["kappa"])
    # Fleiss over i0 (x x x), i1 (x y), i2-i3 (y y), i4 (same same): P_bar .8; p = 4/11, 5/11, 2/11
    assert agree["all"]["n_items"] == 5 and agree["all"]["percent_agreement"] == pytest.approx(6 / 7)
    assert agree["all"]["kappa"] == pytest.approx((0.8 - 45 / 121) / (1 - 45 / 121))

    paths = listen.write_results(tmp_path / "j.sqlite", tmp_path / "out")
    assert paths["pairs"].read_text().splitlines()[0].startswith("system_x,system_y,n,")
    assert "| run_a:r0 | run_a:r1 | 19 |" in paths["results"].read_text()
    section = listen.report_section(tmp_path, db_path=tmp_path / "j.sqlite")
    assert "<h2>Human listening test</h2>" in section and "&lt;i&gt;carol&lt;/i&gt;" in section
    assert "<i>carol" not in section and "Wilson" in section
    assert listen.report_section(tmp_path / "elsewhere") == ""  # no database, no section


# ---------------------------------------------------------------------------------------------
# judgments -> preference pairs
# ---------------------------------------------------------------------------------------------
def test_human_pairs_majority_ties_skipped_codes_as_chosen_rejected(tmp_path, caplog):
    run = tmp_path / "runs" / "run_a"
    codes = {("u1", 0): [1, 2, 3, 4], ("u1", 1): [1, 2, 5]}
    for k in (0, 1):
        rows = []
        for i in range(1, 8):
            row = {"id": f"u{i}", "text": f"text {i}", "speaker": "spk", "prompt_id": f"p{i}", "round": k,
                   "saved_audio": f"audio/u{i}.wav", "codes": codes.get((f"u{i}", k), [i, k, i + k])}
            if i == 7:
                del row["codes"]  # a run evaluated before codes were saved
            rows.append(row)
        write_jsonl(run / f"round_{k:03d}" / "eval" / "rows.jsonl", rows)
    x, y = ("run_a:r0", str(run), 0), ("run_a:r1", str(run), 1)
    store = listen.Store(tmp_path / "j.sqlite")
    votes = {"i1": [("alice", "x", "XY"), ("bob", "x", "YX")],                      # 2-0: x
             "i2": [("alice", "y", "XY"), ("bob", "x", "XY")],                      # 1-1: raters tied, skipped
             "i3": [("alice", "same", "XY"), ("bob", "same", "YX")],                # same: skipped
             "i4": [("alice", "y", "YX")],                                          # one rater: y
             "i5": [("alice", "x", "XY"), ("bob", "same", "XY"), ("carol", "x", "YX")],  # 2 x vs 1 same: x
             "i6": [("alice", "x", "XY"), ("bob", "same", "YX")],                   # x vs same tied: skipped
             "i7": [("alice", "x", "XY")]}                                          # no codes: skipped
    for item, vs in votes.items():
        for rater, outcome, order in vs:
            store.add_judgment(_judgment(rater, item, outcome, order, x, y))
    with caplog.at_level("INFO", logger="speechalign.eval"):
        pairs = listen.human_pairs(tmp_path / "j.sqlite")
    assert "no `codes`" in caplog.text and "raters_tied" in caplog.text
    by_id = {p["id"]: p for p in pairs}
    assert sorted(by_id) == ["u1", "u4", "u5"]
    u1 = by_id["u1"]
    assert (u1["chosen_codes"], u1["rejected_codes"]) == ([1, 2, 3, 4], [1, 2, 5])
    # edit distance 2 (3->5, drop 4) over the longer length 4; length ratio rejected/chosen = 3/4 (as in align/pairs)
    assert u1["scores"] == {"token_distance": 0.5, "length_ratio": pytest.approx(3 / 4), "votes": 2, "n_judgments": 2}
    assert (u1["keep"], u1["source"], u1["prompt_id"], u1["text"], u1["speaker"]) == (True, "human", "p1", "text 1", "spk")
    assert u1["judged"]["chosen"] == "run_a:r0" and u1["judged"]["rejected"] == "run_a:r1"
    assert (by_id["u4"]["chosen_codes"], by_id["u4"]["rejected_codes"]) == ([4, 1, 5], [4, 0, 4])  # y = round 1
    assert by_id["u5"]["scores"]["votes"] == 2 and by_id["u5"]["scores"]["n_judgments"] == 3
    assert by_id["u5"]["chosen_codes"] == [5, 0, 5]

    # a moved run is found by its folder name; runs that match none give no pairs
    moved = tmp_path / "moved" / "run_a"
    shutil.copytree(run, moved)
    shutil.rmtree(run)
    assert [p["id"] for p in listen.human_pairs(tmp_path / "j.sqlite", [str(moved)])] == ["u1", "u4", "u5"]
    assert listen.human_pairs(tmp_path / "j.sqlite", [str(tmp_path / "other")]) == []


def test_listening_beyond_loopback_is_served_by_waitress_not_flasks_dev_server(tmp_path, monkeypatch):
    """Flask's development server says it is not for production; raters beyond this machine get waitress."""
    import flask
    import waitress

    from eval import listen_app

    run = make_run(tmp_path)
    served = []
    monkeypatch.setattr(waitress, "serve", lambda app, host, port, threads: served.append(("waitress", host, port)))
    monkeypatch.setattr(flask.Flask, "run", lambda self, host, port, **kw: served.append(("flask", host, port)))
    listen_app.serve([str(run)], rounds=[0, 1], port=8123, host="0.0.0.0", db_path=str(tmp_path / "j.sqlite"))
    listen_app.serve([str(run)], rounds=[0, 1], port=8124, host="127.0.0.1", db_path=str(tmp_path / "j.sqlite"))
    assert served == [("waitress", "0.0.0.0", 8123), ("flask", "127.0.0.1", 8124)]
