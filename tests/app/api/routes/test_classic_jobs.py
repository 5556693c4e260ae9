"""Classic ptq / qat jobs through the service: upload a model and a dataset, submit a job
that names them, run it in a worker, and get a report whose figures match an independent
evaluation; unknown or unusable uploads are refused at submission."""

import io
import json

import numpy as np
import torch
from safetensors.torch import save_model

from app.models import JobStatus
from quantcore.models.digits_cnn import digits_split, top1, train_digits_cnn
from worker import tasks


def _upload_model(client, model, folder) -> str:
    path = folder / "model.safetensors"
    save_model(model, str(path))
    files = {"file": ("model.safetensors", path.read_bytes(), "application/octet-stream")}
    response = client.post("/v1/models", files=files, data={"config": json.dumps({"architecture": "digits-cnn"})})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def _upload_arrays(client, x, y=None) -> str:
    buffer = io.BytesIO()
    np.savez(buffer, **({"x": x} if y is None else {"x": x, "y": y}))
    response = client.post("/v1/datasets", files={"file": ("data.npz", buffer.getvalue(), "application/octet-stream")})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def test_uploaded_model_and_data_run_as_a_ptq_job(client, monkeypatch, tmp_path, one_thread):
    split = digits_split(0)
    model = train_digits_cnn(split, seed=0, epochs=3)
    model_id = _upload_model(client, model, tmp_path)
    train_id = _upload_arrays(client, split.train_x[:500].numpy(), split.train_y[:500].numpy())
    test_id = _upload_arrays(client, split.test_x.numpy(), split.test_y.numpy())

    body = {"kind": "ptq", "model": f"upload:{model_id}",
            "data": {"train": f"upload:{train_id}", "evaluation": f"upload:{test_id}"},
            "ptq": {"method": "rtn", "weight_bits": 8, "activation_bits": 8}}
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["recipe"]["kind"] == "ptq" and job["recipe"]["ptq"]["method"] == "rtn"

    monkeypatch.setattr("worker.progress.MIN_WRITE_INTERVAL_S", 0.0)
    tasks.run_quantization_job.run(job["id"])
    finished = client.get(f"/v1/jobs/{job['id']}").json()
    assert finished["status"] == JobStatus.SUCCEEDED.value, finished
    report = client.get(f"/v1/jobs/{job['id']}/report").json()
    # the float model's accuracy, measured here without the service
    assert abs(report["metrics"]["baseline"]["top1"] - top1(model, split.test_x, split.test_y)) < 1e-3
    assert report["metrics"]["baseline"]["top1"] - report["metrics"]["quantized"]["top1"] < 2  # W8A8 is near-lossless
    assert client.get(f"/v1/jobs/{job['id']}/artifact").status_code == 200


def test_classic_jobs_naming_what_is_not_there_are_refused(client):
    missing = "upload:" + "0" * 32
    response = client.post("/v1/jobs", json={"kind": "qat", "model": missing})
    assert response.status_code == 422 and "POST /v1/models" in response.text
    response = client.post("/v1/jobs", json={"kind": "qat", "data": {"train": missing}})
    assert response.status_code == 422 and "POST /v1/datasets" in response.text
    response = client.post("/v1/jobs", json={"kind": "qat", "model": "/etc/passwd"})
    assert response.status_code == 422 and "upload:<id>" in response.text
    response = client.post("/v1/jobs", json={"kind": "sideways"})
    assert response.status_code == 422 and "kind must be" in response.text

    text = client.post("/v1/datasets", files={"file": ("t.jsonl", b'{"text": "hello"}\n', "application/octet-stream")})
    assert text.status_code == 201, text.text
    response = client.post("/v1/jobs", json={"kind": "ptq", "data": {"train": f"upload:{text.json()['id']}"}})
    assert response.status_code == 422 and "text dataset" in response.text
