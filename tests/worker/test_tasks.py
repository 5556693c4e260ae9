import hashlib
import json
import tarfile

import pytest

import quantcore.job
from app.models import JobStatus
from quantcore.job import STAGES
from worker import tasks


def fake_run_job(fail: Exception | None = None, formats: tuple[str, ...] = ()):
    """Walks through every stage like quantcore, writes a small artifact folder (one per
    export format when `formats` are given, listed in the report as run_job does)."""

    def run_job(request, output_dir, progress, allow_local_paths=True, locate=None):
        assert allow_local_paths is False  # the service never lets a request name worker files
        output_dir.mkdir(parents=True)
        for stage in STAGES:
            for i in range(3):
                progress(stage, i + 1, 3, f"{stage} {i + 1}/3")
            if fail is not None and stage == "quantize":
                raise fail
        report = {"metrics": {"quantized": {"perplexity": 12.5}}, "model": request.model}
        if formats:
            report["artifacts"] = [{"format": fmt, "folder": f"artifact-{fmt}"} for fmt in formats]
        for artifact in report.get("artifacts", [{"folder": "artifact"}]):
            folder = output_dir / artifact["folder"]
            folder.mkdir()
            (folder / "report.json").write_text(json.dumps(report))
        return report

    return run_job


@pytest.fixture
def run(monkeypatch, settings, new_job):
    def start(fake, job_id: str | None = None) -> str:
        monkeypatch.setattr(quantcore.job, "run_job", fake)
        monkeypatch.setattr("worker.progress.MIN_WRITE_INTERVAL_S", 0.0)
        job_id = job_id or new_job()
        tasks.run_quantization_job.run(job_id)
        return job_id

    return start


def test_a_job_runs_to_an_archived_artifact(run, load_job, settings):
    job = load_job(run(fake_run_job()))
    assert job.status == JobStatus.SUCCEEDED and job.attempts == 1 and job.error is None
    assert job.report["metrics"]["quantized"]["perplexity"] == 12.5
    archive = settings.artifact_dir / job.artifact_path
    assert archive == settings.artifact_dir / f"{job.id}.tar"
    assert job.artifact_sha256 == hashlib.sha256(archive.read_bytes()).hexdigest()
    assert job.artifact_bytes == archive.stat().st_size
    with tarfile.open(archive) as tar:
        assert "artifact/report.json" in tar.getnames()
    assert job.progress_percent == 100.0 and job.finished_at >= job.started_at
    assert not (settings.work_dir / job.id).exists()


def test_each_export_format_is_archived_with_its_own_checksum(run, load_job, settings):
    job = load_job(run(fake_run_job(formats=("compressed-tensors", "qforge"))))
    assert job.status == JobStatus.SUCCEEDED
    artifacts = job.report["artifacts"]
    assert [a["file"] for a in artifacts] == [f"{job.id}.tar", f"{job.id}.qforge.tar"]
    for artifact in artifacts:
        archive = settings.artifact_dir / artifact["file"]
        assert artifact["sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()
        assert artifact["bytes"] == archive.stat().st_size
        with tarfile.open(archive) as tar:
            assert f"{artifact['folder']}/report.json" in tar.getnames()
    # the job's main artifact is the first format asked for
    assert (job.artifact_path, job.artifact_sha256) == (artifacts[0]["file"], artifacts[0]["sha256"])


def test_a_failing_job_records_a_readable_reason_and_leaves_no_files(run, load_job, settings):
    error = ValueError("group_size 7 does not divide the input dimension 576")
    job = load_job(run(fake_run_job(fail=error)))
    assert job.status == JobStatus.FAILED
    assert job.error == "ValueError: group_size 7 does not divide the input dimension 576"
    assert job.progress_stage == "quantize"
    assert not (settings.artifact_dir / f"{job.id}.tar").exists()
    assert not (settings.work_dir / job.id).exists()


def test_a_cancel_request_stops_the_job_at_its_next_progress_call(run, new_job, load_job, settings):
    from app.core.db import session_scope
    from app.crud import request_cancel

    job_id = new_job()

    def cancelled_midway(request, output_dir, progress, allow_local_paths=False, locate=None):
        output_dir.mkdir(parents=True)
        (output_dir / "partial.bin").write_bytes(b"x")
        progress("load", 0, 1)
        with session_scope() as session:
            assert request_cancel(session, job_id)
        progress("baseline", 0, 1)
        raise AssertionError("progress should have raised JobCancelled")

    job = load_job(run(cancelled_midway, job_id))
    assert job.status == JobStatus.CANCELLED and job.cancel_requested
    assert job.progress_stage == "baseline"
    assert not (settings.work_dir / job.id).exists()


def test_a_finished_job_is_not_run_again(run, load_job, monkeypatch):
    job_id = run(fake_run_job())
    monkeypatch.setattr(quantcore.job, "run_job", fake_run_job(fail=RuntimeError("must not run")))
    tasks.run_quantization_job.run(job_id)
    job = load_job(job_id)
    assert job.status == JobStatus.SUCCEEDED and job.attempts == 1


def test_failure_reason_is_type_and_message_without_traceback():
    assert tasks.failure_reason(KeyError("lm_head")) == "KeyError: 'lm_head'"
    assert tasks.failure_reason(MemoryError()) == "out of memory on the worker: MemoryError"
    assert len(tasks.failure_reason(ValueError("x" * 5000))) == 2000
    assert "Traceback" not in tasks.failure_reason(RuntimeError("boom"))


def test_running_out_of_disk_or_memory_says_so_and_leaves_no_partial_files(run, load_job, settings):
    import errno

    def out_of(error: Exception):
        def run_job(request, output_dir, progress, allow_local_paths=False, locate=None):
            progress("export", 0, 1, "writing qforge")
            (output_dir / "artifact").mkdir(parents=True)
            (output_dir / "artifact" / "model.safetensors").write_bytes(b"half a model")
            raise error

        return run_job

    disk = load_job(run(out_of(OSError(errno.ENOSPC, "No space left on device"))))
    assert disk.status == JobStatus.FAILED
    assert disk.error == "out of disk space on the worker: OSError: [Errno 28] No space left on device"
    # torch's allocator raises a RuntimeError; the cause is found in its text
    torch_oom = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 402653184 bytes.")
    memory = load_job(run(out_of(torch_oom)))
    assert memory.status == JobStatus.FAILED and memory.error.startswith("out of memory on the worker: RuntimeError")
    wrapped = ValueError("could not write the artifact")
    wrapped.__cause__ = OSError(errno.EFBIG, "File too large")
    assert tasks.failure_reason(wrapped).startswith("a file grew past the worker's file-size limit")
    for job in (disk, memory):
        assert not (settings.work_dir / job.id).exists()
        assert list(settings.artifact_dir.glob(f"{job.id}*")) == []


def test_an_interruption_that_surfaces_as_another_error_still_ends_cancelled(run, new_job, load_job, monkeypatch):
    import time

    from app.core.db import session_scope
    from app.crud import request_cancel

    monkeypatch.setattr("worker.progress.CANCEL_POLL_S", 0.05)
    job_id = new_job()

    def wraps_everything(request, output_dir, progress, allow_local_paths=False, locate=None):
        progress("evaluate", 0, 1)
        with session_scope() as session:
            request_cancel(session, job_id)
        try:
            while True:  # a long step with no progress call, inside a library that wraps errors
                time.sleep(0.01)
        except Exception as exc:
            raise RuntimeError("evaluation failed") from exc

    started = time.monotonic()
    job = load_job(run(wraps_everything, job_id))
    assert job.status == JobStatus.CANCELLED and job.error is None
    assert time.monotonic() - started < 5


def test_a_finished_job_shows_all_steps_done_even_when_progress_was_throttled(run, load_job, monkeypatch):
    fake = fake_run_job()

    def throttled(*args, **kwargs):
        monkeypatch.setattr("worker.progress.MIN_WRITE_INTERVAL_S", 3600.0)  # only stage changes get written
        return fake(*args, **kwargs)

    job = load_job(run(throttled))
    assert job.status == JobStatus.SUCCEEDED
    assert (job.progress_stage, job.progress_current, job.progress_total) == ("export", 3, 3)


@pytest.fixture
def s3_settings(settings, s3_env, monkeypatch):
    """The worker's settings with the artifacts in a bucket of a local S3 server."""
    from app.core.config import get_settings

    for name, value in s3_env.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    return get_settings()


def _bucket_objects(settings) -> dict[str, bytes]:
    from app.artifact_store import store_for

    store = store_for(settings)
    listing = store.client.list_objects_v2(Bucket=store.bucket).get("Contents", [])
    return {o["Key"].removeprefix(store.prefix): b"".join(store.read(o["Key"].removeprefix(store.prefix))) for o in listing}


def test_with_an_s3_store_each_archive_lands_in_the_bucket(run, load_job, s3_settings):
    job = load_job(run(fake_run_job(formats=("qforge", "gguf"))))
    assert job.status == JobStatus.SUCCEEDED, job.error
    stored = _bucket_objects(s3_settings)
    assert sorted(stored) == sorted(a["file"] for a in job.report["artifacts"])
    for artifact in job.report["artifacts"]:
        data = stored[artifact["file"]]
        assert (hashlib.sha256(data).hexdigest(), len(data)) == (artifact["sha256"], artifact["bytes"])
    assert not list(s3_settings.artifact_dir.glob("*.tar"))  # nothing kept on the worker's disk
    assert not (s3_settings.work_dir / job.id).exists()
    assert job.progress_message == "done"


def test_with_an_s3_store_a_failed_job_leaves_nothing_in_the_bucket(run, new_job, load_job, s3_settings, tmp_path):
    from app.artifact_store import store_for

    job_id = new_job()
    stale = tmp_path / "stale.tar"
    stale.write_bytes(b"an earlier, lost attempt's archive")
    store_for(s3_settings).put(f"{job_id}.tar", stale)
    job = load_job(run(fake_run_job(fail=ValueError("bad group size")), job_id))
    assert job.status == JobStatus.FAILED
    assert _bucket_objects(s3_settings) == {}


def test_an_unreachable_store_fails_the_job_with_the_reason(run, load_job, settings, monkeypatch, closed_port):
    from app.core.config import get_settings

    monkeypatch.setenv("QFORGE_ARTIFACT_URL", "s3://qforge-artifacts")
    monkeypatch.setenv("QFORGE_S3_ENDPOINT_URL", f"http://127.0.0.1:{closed_port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    get_settings.cache_clear()
    job = load_job(run(fake_run_job()))
    assert job.status == JobStatus.FAILED
    assert job.error.startswith("ArtifactStoreError: could not upload s3://qforge-artifacts/")


def job_log(job_id: str) -> list[tuple[str, str | None, str, int | None]]:
    """The job's stored log as (level, stage, message, attempt)."""
    from app import joblog
    from app.core.db import session_scope

    with session_scope() as session:
        return [(r.level.value, r.stage, r.message, r.attempt) for r in joblog.read(session, job_id, limit=None)]


def test_a_job_logs_its_start_each_stage_its_notes_and_its_success(run, load_job, settings):
    job = load_job(run(fake_run_job()))
    size = (settings.artifact_dir / f"{job.id}.tar").stat().st_size
    # one line per stage, not one per progress call (fake_run_job reports three per stage)
    assert job_log(job.id) == [
        ("info", None, "started", 1),
        *[("info", stage, f"{stage} started: {stage} 1/3", 1) for stage in STAGES],
        ("info", STAGES[-1], f"storing {job.id}.tar ({size} bytes) in the artifact store", 1),
        ("info", STAGES[-1], f"succeeded; artifacts: {job.id}.tar ({size} bytes)", 1),
    ]


def test_a_failed_job_logs_the_reason_at_the_stage_it_failed(run, load_job):
    job = load_job(run(fake_run_job(fail=ValueError("group_size 7 does not divide 576"))))
    lines = job_log(job.id)
    assert [stage for _, stage, _, _ in lines[1:-1]] == ["load", "baseline", "quantize"]
    assert lines[-1] == ("error", "quantize", "failed: ValueError: group_size 7 does not divide 576", 1)
    assert job.error == "ValueError: group_size 7 does not divide 576"


def test_a_cancelled_job_logs_the_request_and_where_it_stopped(run, new_job, load_job):
    from app.core.db import session_scope
    from app.crud import request_cancel

    job_id = new_job()

    def cancelled_midway(request, output_dir, progress, allow_local_paths=False, locate=None):
        progress("load", 0, 1)
        with session_scope() as session:
            request_cancel(session, job_id)
        progress("baseline", 0, 1)

    run(cancelled_midway, job_id)
    assert [(level, stage, message) for level, stage, message, _ in job_log(job_id)] == [
        ("info", None, "started"),
        ("info", "load", "load started"),
        ("warning", None, "cancellation requested; a running job stops within about a second"),
        ("info", "baseline", "baseline started"),
        ("warning", "baseline", "cancelled on request"),
    ]


def test_a_log_line_that_cannot_be_written_does_not_fail_the_job(run, load_job, monkeypatch):
    from sqlalchemy.exc import OperationalError

    from app.models import JobLog

    def broken(self, *args, **kwargs):  # every log insert fails, as with a full disk on that table
        raise OperationalError("INSERT INTO job_log", {}, Exception("disk I/O error"))

    monkeypatch.setattr(JobLog, "__init__", broken)
    job = load_job(run(fake_run_job()))
    assert job.status == JobStatus.SUCCEEDED and job_log(job.id) == []


def test_every_line_of_a_run_carries_its_job_id_and_attempt(run, new_job, json_log):
    job_id = new_job()
    run(fake_run_job(), job_id)
    lines = [line for line in json_log() if line["logger"].startswith("worker.")]
    messages = [line["message"] for line in lines]
    assert messages[0] == f"job {job_id}: attempt 1 starting" and messages[-1].startswith(f"job {job_id}: succeeded")
    assert all(line["job_id"] == job_id and line["attempt"] == 1 for line in lines)
