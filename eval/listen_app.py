"""``speechalign listen``: a local blind A/B listening page whose judgments become preference pairs.

    speechalign listen RUN_DIR [RUN_DIR ...] [--rounds 0,3] [--port 8765] [--host H] [--db FILE]
    speechalign listen --results RUN_DIR [--db FILE] [--out DIR]

A rater enters a name and hears, item after item, the same text and target speaker from two
systems (rounds of one run, or runs at one round) as "A" and "B", sides shuffled, names hidden,
with the speaker's real recording as reference. A vote counts only when the server has been told
that both clips were heard (played to the end, or for ``eval.listen.MIN_PLAY_SECONDS``).

What the server trusts: nothing from a request names a file. Audio is served by opaque clip ids
from a table built at start-up from the given runs' ``eval/rows.jsonl`` (saved outputs inside the
run directories, and the reference recordings those rows name, if they are audio files). Requests
whose path holds ``..``, ``//``, a backslash or a NUL are refused before routing; every error is a
4xx JSON ``{"error": message}``. POSTs must be JSON (a cross-site form cannot send that without a
CORS preflight, which this server never answers). The page writes all text with ``textContent``,
and its inline script runs under a per-response CSP nonce, so a ``<script>`` in a text stays text.
There is no authentication: bind to 127.0.0.1 (the default) unless every host that can reach the
port may vote.
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import math
import mimetypes
import re
import secrets
import sys
from pathlib import Path
from urllib.parse import unquote

from eval.listen import (CHOICES, Item, Store, build_items, default_db_path, opaque_id, played_threshold,
                         rater_order, shown_order, write_results)

log = logging.getLogger("speechalign.eval")

PAGE = Path(__file__).with_name("listen_page.html")
OPAQUE_ID = re.compile(r"[0-9a-f]{16}")
MAX_NAME = 64
SCORE_KEYS = ("qmos_a", "qmos_b", "smos_a", "smos_b")


class _Refused(Exception):
    """A request the app turns down: HTTP status, message, and a machine-readable reason."""

    def __init__(self, status: int, message: str, reason: str = "bad_request"):
        super().__init__(message)
        self.status, self.message, self.reason = status, message, reason


def _rater(value) -> str:
    """A rater name as given (trimmed); any printable text up to MAX_NAME characters."""
    if not isinstance(value, str) or not value.strip():
        raise _Refused(400, "rater: a non-empty name is required", "bad_rater")
    name = value.strip()
    if len(name) > MAX_NAME or any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        raise _Refused(400, f"rater: at most {MAX_NAME} printable characters", "bad_rater")
    return name


def _score(body: dict, key: str) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 5:
        raise _Refused(400, f"{key}: an integer 1-5 or null, got {v!r}", "bad_score")
    return v


def _seconds(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise _Refused(400, f"seconds: a finite number >= 0, got {value!r}", "bad_seconds")
    return float(value)


def create_app(run_dirs: list[str], rounds: list[int] | None, db_path: str | None, seed: int = 0):
    """The Flask app over ``run_dirs`` (see the module docstring); judgments go to ``db_path``
    (default ``<first run>/listen/judgments.sqlite``). Returns ``flask.Flask``."""
    from flask import Flask, jsonify, render_template_string, request, send_file
    from werkzeug.exceptions import HTTPException

    items = build_items(run_dirs, rounds)
    by_id: dict[str, Item] = {it.item_id: it for it in items}
    # Opaque clip ids -> files: the only files the app ever serves. Per (item, system) so an id says
    # nothing about which system it is; the seed makes them differ between tests of the same runs.
    clips: dict[str, str] = {}
    clip_of: dict[tuple[str, str], str] = {}
    for it in items:
        for which, path in (("x", it.clip_x), ("y", it.clip_y), ("ref", it.reference)):
            if path is not None:
                cid = opaque_id(seed, it.item_id, which)
                clips[cid] = path
                clip_of[(it.item_id, which)] = cid
    store = Store(db_path or default_db_path(run_dirs[0]))
    old_seed = store.get_meta("seed")
    if old_seed is not None and old_seed != str(seed):
        log.warning("listen: %s was filled with seed %s, now %d: raters' item order and sides change for their "
                    "remaining items (stored judgments keep the order they were shown in)", store.path, old_seed, seed)
    store.set_meta("seed", str(seed))
    template = PAGE.read_text(encoding="utf-8")

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = 16 * 1024  # votes are tiny; anything bigger is refused with a 413
    app.json.sort_keys = False

    def sides(it: Item, rater: str) -> dict[str, str]:
        """Side -> "x"/"y" for this rater."""
        return {"A": "x", "B": "y"} if shown_order(it, rater, seed) == "XY" else {"A": "y", "B": "x"}

    def state(rater: str) -> dict:
        judged = store.judged_items(rater)
        order = rater_order(items, rater, seed)
        done = sum(it.item_id in judged for it in order)
        nxt = next((it for it in order if it.item_id not in judged), None)
        out: dict = {"rater": rater, "total": len(order), "done": done, "item": None}
        if nxt is not None:
            s = sides(nxt, rater)
            dur = {"x": nxt.duration_x, "y": nxt.duration_y}
            ref = clip_of.get((nxt.item_id, "ref"))
            out["item"] = {"id": nxt.item_id, "position": done + 1, "text": nxt.text, "speaker": nxt.speaker,
                           "reference": f"/audio/{ref}" if ref else None,
                           "clips": {side: f"/audio/{clip_of[(nxt.item_id, w)]}" for side, w in s.items()},
                           "min_seconds": {side: round(played_threshold(dur[w]), 3) for side, w in s.items()},
                           "played": store.played_sides(rater, nxt.item_id)}
        return out

    def body() -> dict:
        if not request.is_json:
            raise _Refused(415, "send a JSON object with Content-Type: application/json", "not_json")
        data = request.get_json(silent=True)
        if not isinstance(data, dict):
            raise _Refused(400, "the body is not a JSON object", "bad_json")
        return data

    def item_of(value) -> Item:
        if not isinstance(value, str) or not OPAQUE_ID.fullmatch(value):
            raise _Refused(400, "item: an item id from /api/next", "bad_item")
        if value not in by_id:
            raise _Refused(404, "unknown item (the server was restarted on other runs?)", "unknown_item")
        return by_id[value]

    @app.errorhandler(_Refused)
    def refused(e: _Refused):
        return jsonify(error=e.message, reason=e.reason), e.status

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        return jsonify(error=e.description or e.name, reason=e.name.lower().replace(" ", "_")), e.code

    @app.before_request
    def refuse_odd_paths():
        # Before routing: Werkzeug would otherwise answer "//" with a redirect, and no route needs these.
        raw = request.environ.get("RAW_URI") or request.environ.get("REQUEST_URI") or ""
        for p in (request.path, unquote(unquote(raw.split("?", 1)[0]))):
            if ".." in p or "//" in p or "\\" in p or "\x00" in p:
                raise _Refused(400, "paths with '..', '//', backslashes or NUL are refused; audio is served by clip id",
                               "bad_path")

    @app.after_request
    def headers(resp):
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["Referrer-Policy"] = "no-referrer"
        resp.headers.setdefault("Content-Security-Policy", "default-src 'none'")
        if request.path.startswith("/api/"):
            resp.headers["Cache-Control"] = "no-store"
        return resp

    @app.get("/")
    def page():
        nonce = secrets.token_urlsafe(16)
        resp = app.make_response(render_template_string(template, nonce=nonce))
        resp.headers["Content-Security-Policy"] = (
            f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; media-src 'self'; "
            "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
        return resp

    @app.get("/favicon.ico")
    def favicon():
        return "", 204  # browsers ask for one; a 404 would only clutter the log

    @app.get("/healthz")
    def healthz():
        return jsonify(ok=True, items=len(items))

    @app.get("/api/next")
    def next_item():
        return jsonify(state(_rater(request.args.get("rater"))))

    @app.post("/api/played")
    def played():
        data = body()
        rater, it = _rater(data.get("rater")), item_of(data.get("item"))
        side = data.get("side")
        if side not in ("A", "B"):
            raise _Refused(400, f"side: 'A' or 'B', got {side!r}", "bad_side")
        which = sides(it, rater)[side]
        dur = it.duration_x if which == "x" else it.duration_y
        seconds = min(_seconds(data.get("seconds", 0)), dur + 1.0)  # a report cannot outlast the clip
        store.mark_played(rater, it.item_id, side, seconds, data.get("ended") is True, played_threshold(dur))
        return jsonify(played=store.played_sides(rater, it.item_id))

    @app.post("/api/vote")
    def vote():
        data = body()
        rater, it = _rater(data.get("rater")), item_of(data.get("item"))
        choice = data.get("choice")
        if choice not in CHOICES:
            raise _Refused(400, f"choice: one of {list(CHOICES)}, got {choice!r}", "bad_choice")
        scores = {k: _score(data, k) for k in SCORE_KEYS}
        if it.item_id in store.judged_items(rater):
            raise _Refused(409, "this item is already judged by this rater; the first vote is kept", "duplicate")
        heard = store.played_sides(rater, it.item_id)
        if not all(heard.values()):
            missing = " and ".join(s for s, ok in heard.items() if not ok)
            raise _Refused(409, f"play both clips before voting (not heard yet: {missing})", "not_played")
        s = sides(it, rater)
        sysof = {side: (it.x if w == "x" else it.y) for side, w in s.items()}
        stored = store.add_judgment({
            "rater": rater, "item": it.item_id, "utt_id": it.utt_id,
            "system_a": sysof["A"].label, "run_a": sysof["A"].run_dir, "round_a": sysof["A"].round,
            "system_b": sysof["B"].label, "run_b": sysof["B"].run_dir, "round_b": sysof["B"].round,
            "order_shown": "XY" if s["A"] == "x" else "YX", "choice": choice,
            "winner": None if choice == "same" else sysof[choice].label, **scores})
        if not stored:  # the unique (rater, item) constraint caught a concurrent double submit
            raise _Refused(409, "this item is already judged by this rater; the first vote is kept", "duplicate")
        log.info("listen: %s judged %s: %s", rater, it.item_id, choice)
        return jsonify(stored=True, **state(rater))

    @app.get("/audio/<clip_id>")
    def audio(clip_id: str):
        if not OPAQUE_ID.fullmatch(clip_id):
            raise _Refused(400, "audio is served by the clip ids /api/next gives, nothing else", "bad_clip")
        path = clips.get(clip_id)
        if path is None:
            raise _Refused(404, "unknown clip id", "unknown_clip")
        if not Path(path).is_file():
            raise _Refused(404, "this clip's file is gone from the run directory", "missing_file")
        mime = mimetypes.guess_type(path)[0] or "application/octet-stream"
        return send_file(path, mimetype=mime, conditional=True, max_age=0)

    @app.get("/audio/<path:rest>")
    def audio_path(rest: str):
        raise _Refused(400, "audio is served by clip id only, never by a file path", "bad_clip")

    return app


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def serve(run_dirs: list[str], rounds: list[int] | None = None, port: int = 8765, host: str = "127.0.0.1",
          db_path: str | None = None, seed: int = 0) -> None:
    """Run the listening page until interrupted (Werkzeug's threaded server: a handful of raters)."""
    app = create_app(run_dirs, rounds, db_path, seed=seed)
    if not _is_loopback(host):
        log.warning("listen: serving on %s: the page has no login, anyone who reaches %s:%d can vote", host, host, port)
    log.info("listen: open http://%s:%d/ (judgments: %s)", host if ":" not in host else f"[{host}]", port,
             db_path or default_db_path(run_dirs[0]))
    if _is_loopback(host):  # this machine only: Flask's own server is enough
        app.run(host=host, port=port, threaded=True, debug=False, use_reloader=False)
        return
    # Raters beyond this machine: a production WSGI server, not Flask's development one (which says not to).
    from waitress import serve as waitress_serve

    waitress_serve(app, host=host, port=port, threads=8)


def _rounds(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise ValueError(f"--rounds takes comma-separated round numbers, e.g. 0,3; got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``listen`` options (shared by ``speechalign listen`` and ``python -m eval.listen_app``)."""
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--rounds", help="comma-separated rounds: one run compares them (default first,last); "
                                    "several runs are compared at each (default: each run's last)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--db", help="judgments database (default RUN_DIR/listen/judgments.sqlite of the first run)")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-rater item order and sides")
    p.add_argument("--results", action="store_true",
                   help="do not serve: write win rates, MOS and agreement (CSV + Markdown) and print them")
    p.add_argument("--out", help="--results: output folder (default: beside the database)")
    p.set_defaults(fn=run)
    return p


def add_subparser(sub) -> None:
    """Register ``listen`` on ``speechalign``'s subcommands (``sub``: argparse subparsers)."""
    add_arguments(sub.add_parser("listen", help="blind A/B listening page (human preferences), or --results"))


def run(args: argparse.Namespace) -> int:
    """Serve the page, or with ``--results`` write and print the results."""
    db = args.db or str(default_db_path(args.run_dirs[0]))
    if args.results:
        paths = write_results(db, args.out)
        log.info("listen: wrote %s", ", ".join(str(p) for p in paths.values()))
        print(paths["results"].read_text(encoding="utf-8"))  # the command's output, like `speechalign compare`
        return 0
    serve(args.run_dirs, _rounds(args.rounds), port=args.port, host=args.host, db_path=db, seed=args.seed)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(
        prog="speechalign listen", description="blind A/B listening page whose judgments become preference pairs"))
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S")
    try:
        return args.fn(args)
    except ValueError as e:  # bad runs or options: one clear line, like speechalign's other commands
        log.error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
