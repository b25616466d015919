"""``medxfer serve``: the real server (uvicorn, in a thread) on the tiny run; API, batching, faults, keys, ONNX."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import shutil
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # end to end: a few seconds to a minute each

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from conftest import BREAST  # noqa: E402

KEY = "test-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
PATIENT = "Doe^Jane"
PATIENT_ID = "PID-7731-XQ"


class LogCapture(logging.Handler):
    """Every record of the server's loggers (uvicorn's and medxfer's), formatted, with tracebacks."""

    NAMES = ("medxfer", "uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")

    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record):
        self.lines.append(self.format(record))

    def text(self) -> str:
        return "\n".join(self.lines)

    def __enter__(self):
        self.saved = {}
        for name in self.NAMES:
            lg = logging.getLogger(name)
            self.saved[name] = lg.level
            lg.addHandler(self)
            lg.setLevel(logging.DEBUG)  # everything the server could log, debug lines included
        return self

    def __exit__(self, *exc):
        for name in self.NAMES:
            logging.getLogger(name).removeHandler(self)
            logging.getLogger(name).setLevel(self.saved[name])


def png_bytes(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def breast_pngs(tmp_path_factory) -> list[Path]:
    """Real BreastMNIST test images written as PNG files."""
    out = tmp_path_factory.mktemp("pngs")
    x = np.load(BREAST)["test_images"][:12]
    paths = []
    for i, img in enumerate(x):
        p = out / f"breast_{i:02d}.png"
        p.write_bytes(png_bytes(img))
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def logs():
    with LogCapture() as cap:
        yield cap


@pytest.fixture(scope="module")
def server(tiny_run, logs):
    """The tiny run served with the torch engine and an API key; a long batch wait makes batching observable."""
    from medxfer.serve.app import BackgroundServer, ServeConfig, create_app

    cfg = ServeConfig(run_dir=str(tiny_run), engine="torch", api_key=KEY, max_batch=32, batch_wait_ms=60,
                      max_files=8, max_upload_mb=32)
    with BackgroundServer(create_app(cfg)) as srv:
        with httpx.Client(base_url=srv.url, timeout=60) as client:
            srv.client = client
            yield srv


def files_of(paths) -> list:
    return [("files", (Path(p).name, Path(p).read_bytes(), "image/png")) for p in paths]


def reference(run, paths, engine="torch"):
    """What ``Predictor`` gives for these files (the path ``medxfer predict`` takes)."""
    from medxfer.predict import Predictor

    pred = Predictor(run, engine=engine, batch_size=len(paths))
    x = next(pred.iter_inputs(paths))[1]
    probs = pred.probabilities_of(x)
    return probs, list(pred.frame([str(p) for p in paths], probs)["predicted"])


def assert_error(resp, status: int, code: str, *words: str) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code, body
    msg = body["error"]["message"]
    for w in words:
        assert w.lower() in msg.lower(), (w, msg)
    assert "Traceback" not in resp.text and "File \"" not in resp.text
    return body["error"]


# ------------------------------------------------------------------------------------------ basics
def test_healthz_and_page_stay_open_without_key(server):
    r = server.client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    page = server.client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert 'id="file"' in html and 'id="api-key"' in html and '"auth": true' in html
    # self-contained: no remote script, style, image or font; the CSP forbids them too
    import re

    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert "@import" not in html and "url(http" not in html
    assert "default-src 'none'" in page.headers["content-security-policy"]


def test_model_info(server, tiny_run):
    r = server.client.get("/v1/model", headers=AUTH)
    assert r.status_code == 200, r.text
    info = r.json()
    sha = hashlib.sha256((tiny_run / "model.safetensors").read_bytes()).hexdigest()[:16]
    meta = json.loads((tiny_run / "model.json").read_text())
    assert info["model_id"] == sha
    assert info["labels"] == ["malignant", "benign"] and info["positive_label"] == "malignant"
    assert info["threshold"] == pytest.approx(meta["threshold"]) and info["decision_rule"] == "threshold"
    assert info["input"]["image_size"] == 32 and info["input"]["channels"] == 1
    assert info["input"]["read"] == meta["read"] and ".dcm" in info["input"]["accepted_suffixes"]
    test = info["metrics"]["test"]
    for k in ("auc", "auc_ci", "sensitivity", "sensitivity_ci", "specificity", "specificity_ci", "threshold"):
        assert k in test, k
    assert len(test["auc_ci"]) == 2 and test["auc_ci"][0] <= test["auc"] <= test["auc_ci"][1]
    assert info["model_card"] == (tiny_run / "model_card.md").read_text() and info["engine"] == "torch"
    assert info["model_card"].startswith(f"# Model card: {tiny_run.name}\n")
    assert info["server"]["api_key_required"] is True and KEY not in r.text


# ------------------------------------------------------------------------------------------ predict
def test_predict_matches_predictor(server, tiny_run, breast_pngs):
    paths = breast_pngs[:6]
    r = server.client.post("/v1/predict", files=files_of(paths), headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["labels"] == ["malignant", "benign"] and body["positive_label"] == "malignant"
    assert body["model_id"] and body["threshold"] == pytest.approx(server.app.state.service.model.meta.threshold)
    ref, ref_pred = reference(tiny_run, paths)
    assert [p["index"] for p in body["predictions"]] == list(range(6))
    got = np.array([[p["probabilities"][c] for c in body["labels"]] for p in body["predictions"]])
    assert np.abs(got - ref).max() < 1e-6
    assert [p["predicted"] for p in body["predictions"]] == ref_pred
    assert "gradcam_png_base64" not in body["predictions"][0]
    assert not any(p.name in r.text for p in paths)  # file names never come back


def test_each_prediction_has_the_runs_conformal_set(server, tiny_run, breast_pngs):
    """The set of ``medxfer predict``'s conformal_set column, as a list of labels."""
    from medxfer.predict import Predictor

    paths = breast_pngs[:6]
    r = server.client.post("/v1/predict", files=files_of(paths), headers=AUTH)
    assert r.status_code == 200, r.text
    pred = Predictor(tiny_run, batch_size=len(paths))
    x = next(pred.iter_inputs(paths))[1]
    want = pred.frame([str(p) for p in paths], pred.probabilities_of(x))["conformal_set"]
    assert ["|".join(p["conformal_set"]) for p in r.json()["predictions"]] == list(want)


def test_large_png_goes_through_the_worker_thread_and_matches_predictor(server, tiny_run, tmp_path):
    """Small PNGs are decoded on the event loop, others in a thread: both paths give Predictor's answer."""
    from medxfer.serve.app import cheap_to_decode

    rng = np.random.default_rng(0)
    small = tmp_path / "small.png"
    small.write_bytes(png_bytes(np.load(BREAST)["test_images"][0]))
    big = tmp_path / "big.png"  # noise does not compress: above the inline byte and pixel limits
    big.write_bytes(png_bytes(rng.integers(0, 256, (600, 600), dtype=np.uint8)))
    assert cheap_to_decode([(small.read_bytes(), ".png")])
    assert not cheap_to_decode([(big.read_bytes(), ".png")])
    r = server.client.post("/v1/predict", files=files_of([small, big]), headers=AUTH)
    assert r.status_code == 200, r.text
    got = np.array([[p["probabilities"][c] for c in r.json()["labels"]] for p in r.json()["predictions"]])
    ref, _ = reference(tiny_run, [small, big])
    assert np.abs(got - ref).max() < 1e-6


def test_cheap_to_decode_reads_the_png_header_only():
    from medxfer.serve.app import INLINE_DECODE_PIXELS, cheap_to_decode

    flat_big = png_bytes(np.zeros((1024, 1024), np.uint8))  # a few KB, but a million pixels
    assert len(flat_big) < 64 * 1024 and 1024 * 1024 > INLINE_DECODE_PIXELS
    assert not cheap_to_decode([(flat_big, ".png")])
    tiny = png_bytes(np.zeros((28, 28), np.uint8))
    assert cheap_to_decode([(tiny, ".png"), (tiny, ".png")])
    assert not cheap_to_decode([(tiny, ".jpg")])                   # only PNG headers are read
    assert not cheap_to_decode([(b"GIF89a" + tiny[6:], ".png")])    # not a PNG signature
    assert not cheap_to_decode([(tiny, ".png")] * (64 * 1024 // len(tiny) + 1))  # too many bytes in all


def test_concurrent_requests_are_batched(server, tiny_run, breast_pngs):
    batcher = server.app.state.service.batcher
    calls0, images0 = batcher.calls, batcher.images
    ref, _ = reference(tiny_run, breast_pngs)
    results: dict[int, dict] = {}
    barrier = threading.Barrier(len(breast_pngs))

    def one(i):
        with httpx.Client(base_url=server.url, timeout=60) as c:
            barrier.wait()
            results[i] = c.post("/v1/predict", files=files_of([breast_pngs[i]]), headers=AUTH).json()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(breast_pngs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == len(breast_pngs)
    calls, images = batcher.calls - calls0, batcher.images - images0
    assert images == len(breast_pngs)
    assert calls < len(breast_pngs), f"{calls} model calls for {images} concurrent requests: not batched"
    assert max(batcher.sizes) > 1
    for i, body in results.items():  # each caller gets its own image's answer back
        p = body["predictions"][0]
        assert abs(p["probabilities"]["malignant"] - ref[i, 0]) < 1e-6


def test_explain_returns_png(server, breast_pngs):
    from PIL import Image

    r = server.client.post("/v1/predict?explain=true", files=files_of(breast_pngs[:2]), headers=AUTH)
    assert r.status_code == 200, r.text
    for p in r.json()["predictions"]:
        raw = base64.b64decode(p["gradcam_png_base64"])
        assert raw[:8] == b"\x89PNG\r\n\x1a\n"
        img = Image.open(io.BytesIO(raw))
        img.load()
        assert img.mode == "RGB" and img.size == (256, 256)
        assert np.asarray(img).std() > 0


def dicom_bytes(with_pixels: bool) -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = PATIENT
    ds.PatientID = PATIENT_ID
    ds.Modality = "OT"
    if with_pixels:
        img = np.load(BREAST)["test_images"][0]
        ds.Rows, ds.Columns = img.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = img.astype(np.uint8).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_dicom_upload_is_predicted_without_leaking_identifiers(server, tiny_run, tmp_path, logs):
    data = dicom_bytes(with_pixels=True)
    r = server.client.post("/v1/predict", files=[("files", (f"{PATIENT}.dcm", data, "application/dicom"))],
                           headers=AUTH)
    assert r.status_code == 200, r.text
    path = tmp_path / "scan.dcm"
    path.write_bytes(data)
    ref, _ = reference(tiny_run, [path])
    assert abs(r.json()["predictions"][0]["probabilities"]["malignant"] - ref[0, 0]) < 1e-6
    # no extension at all: recognised by the DICM preamble
    r2 = server.client.post("/v1/predict", files=[("files", ("IM0001", data, "application/octet-stream"))],
                            headers=AUTH)
    assert r2.status_code == 200, r2.text
    for text in (r.text, r2.text, logs.text()):
        assert PATIENT not in text and "Doe" not in text and PATIENT_ID not in text


# ------------------------------------------------------------------------------------------ faults
def huge_header_png(width=60000, height=60000) -> bytes:
    """A valid PNG signature and IHDR claiming width x height, with a tiny IDAT: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def truncated_png() -> bytes:
    rng = np.random.default_rng(0)
    full = png_bytes(rng.integers(0, 255, (200, 200), dtype=np.uint8))
    return full[: len(full) * 3 // 5]


def _faults():
    one = lambda name, data, ctype="application/octet-stream": {"files": [("files", (name, data, ctype))]}  # noqa: E731
    return {
        "truncated_png": (one("scan.png", truncated_png(), "image/png"), 422, "unreadable_image", ("file 0", "truncated")),
        "text_file": (one("notes.txt", b"not an image at all\n" * 10, "text/plain"), 415, "unsupported_type",
                      ("file 0", "not an image type")),
        "text_named_png": (one("fake.png", b"hello, I am text\n" * 10, "image/png"), 422, "unreadable_image",
                           ("file 0", "not a readable image")),
        "huge_header_png": (one("bomb.png", huge_header_png(), "image/png"), 413, "too_many_pixels",
                            ("file 0", "pixels", "limit")),
        "dicom_without_pixels": (one(f"{PATIENT}.dcm", dicom_bytes(with_pixels=False), "application/dicom"), 422,
                                 "unreadable_image", ("file 0", "DICOM without pixel data")),
        "malformed_dicom": (one("x.dcm", b"\x00" * 128 + b"DICM" + b"\xff\x13garbage" * 20), 422, "unreadable_image",
                            ("file 0", "DICOM")),
        "empty_upload": (one("empty.png", b"", "image/png"), 400, "empty_file", ("file 0", "empty")),
        "no_files": ({"data": {"other": "x"}, "files": [("other_file", ("a.png", b"x", "image/png"))]}, 400,
                     "no_files", ("files",)),
        "text_field": ({"data": {"files": "just text"}, "files": [("other", ("a.png", b"x", "image/png"))]}, 400, "not_a_file", ("file 0", "file upload")),
        "too_many_files": ({"files": [("files", (f"{i}.png", b"x", "image/png")) for i in range(9)]}, 413,
                           "too_many_files", ("too many files", "8")),
        "second_file_bad": ({"files": [("files", ("a.png", png_bytes(np.zeros((28, 28), np.uint8)), "image/png")),
                                       ("files", ("b.png", truncated_png(), "image/png"))]}, 422, "unreadable_image",
                            ("file 1",)),
    }


FAULTS = _faults()


@pytest.mark.parametrize("case", list(FAULTS))
def test_fault_is_a_4xx_json_error_and_server_goes_on(server, breast_pngs, logs, case):
    kwargs, status, code, words = FAULTS[case]
    r = server.client.post("/v1/predict", headers=AUTH, **kwargs)
    assert_error(r, status, code, *words)
    assert PATIENT not in r.text and "Doe" not in r.text
    ok = server.client.post("/v1/predict", files=files_of(breast_pngs[:1]), headers=AUTH)
    assert ok.status_code == 200, ok.text


def test_upload_over_limit_is_413(server, breast_pngs):
    big = np.random.default_rng(1).integers(0, 255, 50 * 2**20, dtype=np.uint8).tobytes()
    r = server.client.post("/v1/predict", files=[("files", ("big.png", big, "image/png"))], headers=AUTH)
    assert_error(r, 413, "upload_too_large", "32 MB")
    # a body without Content-Length (chunked) is cut at the limit too
    def chunks():
        head = (b"--B\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.png\"\r\n"
                b"Content-Type: image/png\r\n\r\n")
        yield head
        for _ in range(40):
            yield b"\x00" * 2**20
        yield b"\r\n--B--\r\n"

    r2 = server.client.post("/v1/predict", content=chunks(),
                            headers={**AUTH, "Content-Type": "multipart/form-data; boundary=B"})
    assert_error(r2, 413, "upload_too_large")
    ok = server.client.post("/v1/predict", files=files_of(breast_pngs[:1]), headers=AUTH)
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("headers,words", [
    ({}, ("needs an API key",)),
    ({"Authorization": "Bearer wrong-key-SECRETVALUE"}, ("wrong API key",)),
    ({"X-API-Key": "wrong-key-SECRETVALUE"}, ("wrong API key",)),
    ({"Authorization": "Basic dXNlcjpwYXNz"}, ("needs an API key",)),
])
def test_missing_or_wrong_key_is_401(server, breast_pngs, headers, words):
    for method, url, kw in (("GET", "/v1/model", {}), ("POST", "/v1/predict", {"files": files_of(breast_pngs[:1])})):
        r = server.client.request(method, url, headers=headers, **kw)
        err = assert_error(r, 401, "unauthorized", *words)
        assert "SECRETVALUE" not in err["message"] and KEY not in r.text
        assert r.headers.get("www-authenticate", "").startswith("Bearer")
    assert server.client.get("/v1/model", headers={"X-API-Key": KEY}).status_code == 200


def test_other_errors_are_json(server):
    assert_error(server.client.get("/nowhere"), 404, "not_found", "/v1/predict")
    assert_error(server.client.get("/v1/predict", headers=AUTH), 405, "method_not_allowed")
    assert_error(server.client.post("/v1/predict", content=b"{}", headers={**AUTH, "Content-Type": "application/json"}),
                 415, "not_multipart", "multipart/form-data")
    assert_error(server.client.post("/v1/predict?explain=maybe", files=[("files", ("a.png", b"x"))], headers=AUTH),
                 400, "bad_parameter", "explain")


def test_unexpected_error_is_500_json_without_its_message(server, breast_pngs, logs):
    batcher = server.app.state.service.batcher
    fn = batcher.fn

    def broken(x):
        raise RuntimeError(f"engine failure quoting {PATIENT}")

    batcher.fn = broken
    try:
        r = server.client.post("/v1/predict", files=files_of(breast_pngs[:1]), headers=AUTH)
    finally:
        batcher.fn = fn
    assert_error(r, 500, "internal_error", "server log")
    assert PATIENT not in r.text
    assert "unexpected RuntimeError (message withheld)" in logs.text()
    assert server.client.post("/v1/predict", files=files_of(breast_pngs[:1]), headers=AUTH).status_code == 200


def test_logs_hold_no_identifier_no_traceback(server, logs):
    text = logs.text()
    assert "predict:" in text and "-> 422 unreadable_image" in text and '"POST /v1/predict' in text  # it did capture
    assert PATIENT not in text and "Doe" not in text and PATIENT_ID not in text
    assert "Traceback" not in text and "breast_0" not in text and "notes.txt" not in text and KEY not in text


# ------------------------------------------------------------------------------------------ CLI, hosts, ONNX
def test_non_local_host_without_key_is_refused(tiny_run, tmp_path):
    import typer
    from typer.testing import CliRunner

    from medxfer.commands.serve import register
    from medxfer.errors import MedxferError
    from medxfer.serve.app import ServeConfig

    app = typer.Typer()
    register(app)

    @app.callback()
    def _root():
        pass

    res = CliRunner().invoke(app, ["serve", str(tiny_run), "--host", "0.0.0.0"])
    assert isinstance(res.exception, MedxferError), res.output
    msg = str(res.exception)
    assert "refusing to listen on '0.0.0.0' without an API key" in msg and "--api-key-file" in msg
    assert "\n" not in msg
    for host in ("192.168.1.7", "::", "example.org"):
        with pytest.raises(MedxferError, match="without an API key"):
            ServeConfig(run_dir=str(tiny_run), host=host).check()
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        ServeConfig(run_dir=str(tiny_run), host=host).check()
    ServeConfig(run_dir=str(tiny_run), host="0.0.0.0", api_key="k" * 20).check()
    empty = tmp_path / "key.txt"
    empty.write_text("\n")
    res = CliRunner().invoke(app, ["serve", str(tiny_run), "--api-key-file", str(empty)])
    assert isinstance(res.exception, MedxferError) and "is empty" in str(res.exception)
    res = CliRunner().invoke(app, ["serve", str(tiny_run), "--api-key", "a", "--api-key-file", str(empty)])
    assert isinstance(res.exception, MedxferError) and "not both" in str(res.exception)


def test_onnx_engine(tiny_run, tmp_path, breast_pngs):
    from medxfer.errors import MedxferError
    from medxfer.export import export_run
    from medxfer.serve.app import BackgroundServer, ServeConfig, create_app
    from medxfer.serve.model import ServedModel

    with pytest.raises(MedxferError, match=r"medxfer export"):
        ServedModel.from_run(tiny_run, engine="onnx")
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    export_run(run, fmt="onnx")
    (run / "model_card.md").write_text("# Tiny model\nFor tests only.\n")
    paths = breast_pngs[:5]
    with BackgroundServer(create_app(ServeConfig(run_dir=str(run), engine="auto"))) as srv:
        info = httpx.get(srv.url + "/v1/model").json()  # no key configured: /v1 is open on loopback
        assert info["engine"] == "onnx" and info["model_card"].startswith("# Tiny model")
        r = httpx.post(srv.url + "/v1/predict", files=files_of(paths), timeout=60)
    assert r.status_code == 200, r.text
    got = np.array([[p["probabilities"][c] for c in ("malignant", "benign")] for p in r.json()["predictions"]])
    ref_onnx, pred_onnx = reference(run, paths, engine="onnx")
    ref_torch, _ = reference(run, paths, engine="torch")
    assert np.abs(got - ref_onnx).max() < 1e-6
    assert np.abs(got - ref_torch).max() < 1e-4
    assert [p["predicted"] for p in r.json()["predictions"]] == pred_onnx


def test_one_file_in_the_field_file_is_accepted(server, breast_pngs):
    """``curl -F file=@x.png`` is what most clients send for one image: it gets the same answer as 'files'."""
    one = [("file", (p.name, p.read_bytes(), "image/png")) for p in breast_pngs[:1]]
    a = server.client.post("/v1/predict", files=one, headers=AUTH)
    b = server.client.post("/v1/predict", files=files_of(breast_pngs[:1]), headers=AUTH)
    assert a.status_code == 200, a.text
    assert a.json()["predictions"] == b.json()["predictions"]


def test_the_api_is_described_at_openapi_json(server):
    r = server.client.get("/openapi.json")                  # no key needed, like the page and /healthz
    assert r.status_code == 200
    doc = r.json()
    assert doc["openapi"].startswith("3.1")
    assert set(doc["paths"]) == {"/healthz", "/v1/model", "/v1/predict"}
    post = doc["paths"]["/v1/predict"]["post"]
    assert set(post["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]) == {"files", "file"}
    labels = server.client.get("/v1/model", headers=AUTH).json()["labels"]
    item = post["responses"]["200"]["content"]["application/json"]["schema"]["properties"]["predictions"]["items"]
    assert item["properties"]["predicted"]["enum"] == labels
    assert post["security"] and "apiKey" in doc["components"]["securitySchemes"]


def test_serve_takes_num_threads_into_every_process(tiny_run, monkeypatch):
    """``serve --num-threads N`` reaches the config every worker process builds its model from."""
    from typer.testing import CliRunner

    from medxfer.cli import app
    from medxfer.serve import launch

    import medxfer.serve.app as served

    seen = {}
    monkeypatch.setattr(served, "run", lambda cfg: seen.setdefault("cfg", cfg))    # the server itself is not started
    result = CliRunner().invoke(app, ["serve", str(tiny_run), "--num-threads", "1"])
    assert result.exit_code == 0, result.output
    assert seen["cfg"].threads == 1
