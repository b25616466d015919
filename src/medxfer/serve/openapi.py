"""The OpenAPI 3.1 description of ``medxfer serve``'s API, served at ``GET /openapi.json``.

Written out rather than generated: four routes whose shapes are fixed here and checked by the tests against
what the app answers. The model's labels fill the response's enums, so a client generated from it knows them.
"""

from __future__ import annotations

FIELDS = ("files", "file")   # the multipart field names /v1/predict reads (several files, or one)


def _error() -> dict:
    return {"description": "a JSON error naming the problem",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def openapi(labels: list[str], model_id: str, api_key: bool) -> dict:
    """The document for a model with ``labels``; ``api_key``: the server asks for ``X-API-Key``."""
    label = {"type": "string", "enum": list(labels)}
    prediction = {
        "type": "object", "required": ["index", "probabilities", "predicted", "predicted_probability"],
        "properties": {
            "index": {"type": "integer", "description": "the file's position in the request"},
            "probabilities": {"type": "object", "description": "calibrated probability of each label",
                              "properties": {name: {"type": "number"} for name in labels}},
            "predicted": label,
            "predicted_probability": {"type": "number"},
            "findings": {"type": "array", "items": label,
                         "description": "multi-label runs: every finding at or above its threshold"},
            "conformal_set": {"description": "runs trained with --conformal: the labels whose validation-calibrated "
                              "threshold the image passes (holds the true one with probability >= 1 - alpha per "
                              "class, for images like the validation ones); multi-label: finding -> states",
                              "oneOf": [{"type": "array", "items": label}, {"type": "object"}]},
            "gradcam_png_base64": {"type": "string", "description": "with ?explain=true: a Grad-CAM overlay (PNG)"},
        }}
    files = {"type": "array", "items": {"type": "string", "contentMediaType": "application/octet-stream"}}
    doc = {
        "openapi": "3.1.0",
        "info": {"title": "medxfer serve", "version": model_id,
                 "description": "Calibrated predictions of one medxfer run. Images: PNG, JPEG, TIFF, DICOM, NIfTI, "
                                "as the run reads them."},
        "paths": {
            "/healthz": {"get": {"summary": "liveness (no key needed)",
                                 "responses": {"200": {"description": "the server is up"}}}},
            "/v1/model": {"get": {"summary": "labels, input contract, test metrics with CIs, the model card",
                                  "responses": {"200": {"description": "the model's record",
                                                        "content": {"application/json": {"schema": {
                                                            "type": "object"}}}},
                                                "401": _error()}}},
            "/v1/predict": {"post": {
                "summary": "predict one or more images",
                "parameters": [{"name": "explain", "in": "query", "required": False,
                                "schema": {"type": "boolean", "default": False}}],
                "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                    "type": "object", "description": "the images in the field 'files' (one or more) or 'file'",
                    "properties": {"files": files, "file": files["items"]}}}}},
                "responses": {
                    "200": {"description": "one prediction per file, in order", "content": {"application/json": {
                        "schema": {"type": "object", "properties": {
                            "model_id": {"type": "string"}, "labels": {"type": "array", "items": label},
                            "threshold": {}, "positive_label": {}, "decision_rule": {"type": "string"},
                            "predictions": {"type": "array", "items": prediction}}}}}},
                    **{code: _error() for code in ("400", "401", "408", "413", "415", "422", "431", "503")}}}},
        },
        "components": {"schemas": {"Error": {"type": "object", "properties": {"error": {"type": "object", "properties": {
            "code": {"type": "string"}, "message": {"type": "string"}}}}}}},
    }
    if api_key:  # the /v1/ routes need it; the page, /healthz and this document do not
        doc["components"]["securitySchemes"] = {"apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                                                "bearer": {"type": "http", "scheme": "bearer"}}
        for path in ("/v1/model", "/v1/predict"):
            for op in doc["paths"][path].values():
                op["security"] = [{"apiKey": []}, {"bearer": []}]
    return doc
