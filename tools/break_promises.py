"""Break each README promise on purpose, in a scratch copy, and watch its test go red.

Mutation testing (``tools/mutation-test``) covers the pure modules; the promises below
live in workers, signals and processes, where a tool's random mutants do not reach.
Each entry is one hand-made break of one promise and the tests that must catch it:

    .venv/bin/python tools/break_promises.py            # every promise (about 10 minutes)
    .venv/bin/python tools/break_promises.py cancel     # the promises whose name has "cancel"

The scratch copy is imported through PYTHONPATH, so the console scripts, the workers and
the jobs the tests start all run the broken code. Exit status: 0 when every break turned
its tests red, 1 otherwise (a promise no test defends), 2 when the named tests already
fail on the unbroken copy (a red result would then prove nothing).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# What the scratch copy leaves out: environments, caches and outputs.
IGNORED = shutil.ignore_patterns(".git", ".venv", "mutants", "build", "__pycache__", "*.egg-info",
                                 ".pytest_cache", ".ruff_cache", "demo", "bench-out")
# The tests' temporary directories, inside the scratch copy (see ``kill_leftovers``).
TEMP_DIR = ".pytest-tmp"
# The longest one break may take (its tests normally pass in well under this).
BREAK_TIMEOUT_S = 600


@dataclass(frozen=True)
class Break:
    """One promise broken: ``old`` becomes ``new`` in ``path``; each of ``tests`` must fail.

    ``env``: variables the broken copy needs to start at all (so the tests fail on the
    promise, not on a process that never came up).
    """

    promise: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()


T = "tests/"
BREAKS = [
    Break("cancel terminates running jobs", "worker_tasks/run_job.py",
          "                if not self.watch.while_running():\n"
          "                    killed = runner.kill()",
          "                if False:\n                    killed = runner.kill()",
          (T + "test_reliability.py::test_cancel_kills_running_jobs_and_no_marker_appears",
           T + "test_local_cluster.py::"
               "test_cancel_stops_the_running_job_and_drops_the_queued_ones")),
    Break("a script dies with its worker (death signal)", "worker_tasks/runner.py",
          "    prctl(PR_SET_PDEATHSIG, signal.SIGTERM)\n", "",
          (T + "test_reliability.py::"
               "test_a_worker_killed_mid_job_takes_the_scripts_children_with_it",)),
    Break("a timeout kills the script and everything it started", "worker_tasks/runner.py",
          "    def stop(signum: int, frame: object) -> None:\n        kill_descendants()\n",
          "    def stop(signum: int, frame: object) -> None:\n"
          "        for pid in children(os.getpid()):\n"
          "            os.kill(pid, signal.SIGKILL)\n",
          (T + "test_promises.py::test_a_timeout_kills_the_script_and_its_children",)),
    Break("the collector settles each job by its .done file", "coordinator/collector.py",
          "    present = marker.exists()",
          "    present = job.state.is_success",
          (T + "test_promises.py::"
               "test_the_collector_settles_by_the_done_file_whatever_the_record_says",)),
    Break("--output-file=VALUE is rewritten, its .done beside it", "coordinator/plan.py",
          '        if arg.startswith(flag + "="):\n'
          '            return arg.split("=", 1)[1]\n',
          "",
          (T + "test_promises.py::"
               "test_output_file_equals_form_is_rewritten_with_its_marker_beside_it",
           T + "test_jobs_file.py::test_output_file_is_found_and_rewritten_exactly")),
    Break("job_id and node are safe names (no '/')", "worker_tasks/spec.py",
          'SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\\Z")',
          'SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,127}\\Z")',
          (T + "test_jobs_file.py::test_each_bad_field_is_named_in_one_line",)),
    Break("the merged Step 3 ranking breaks score ties by seed", "coordinator/mergers/scoring.py",
          'results.sort(key=lambda record: (-record["score"], record["seed"]))',
          'results.sort(key=lambda record: -record["score"])',
          (T + "test_promises.py::test_the_merged_ranking_breaks_score_ties_by_seed",)),
    Break("exit 6 when the local cluster cannot start", "coordinator/errors.py",
          '    """The local cluster could not start Redis or one of its workers."""\n\n'
          "    exit_code = ExitCode.CLUSTER_FAILED",
          '    """The local cluster could not start Redis or one of its workers."""\n\n'
          "    exit_code = ExitCode.JOBS_FAILED",
          (T + "test_promises.py::test_exit_6_when_the_local_cluster_cannot_start",)),
    Break("exit 5 when --timeout passes (scripts-coordinator and submit --wait)",
          "coordinator/errors.py",
          "    exit_code = ExitCode.WAIT_TIMEOUT", "    exit_code = ExitCode.JOBS_FAILED",
          (T + "test_promises.py::test_exit_5_when_the_timeout_passes",)),
    Break("retry runs cancelled jobs again (Run.retry_failed)", "worker_tasks/tracking.py",
          "RETRYABLE = (JobState.FAILED, JobState.CANCELLED, JobState.LOST)",
          "RETRYABLE = (JobState.FAILED, JobState.LOST)",
          (T + "test_promises.py::test_the_python_api_cancels_retries_reports_progress",
           T + "test_tracking.py::test_each_transition_is_allowed_from_its_states_and_refused"
               "_from_every_other")),
    Break("a cancel never lands once the marker is being written", "worker_tasks/tracking.py",
          "CANCELLABLE = (JobState.QUEUED, JobState.RUNNING, JobState.LOST, JobState.HELD)",
          "CANCELLABLE = (JobState.QUEUED, JobState.RUNNING, JobState.LOST, JobState.HELD,\n"
          "               JobState.FINISHING)",
          (T + "test_tracking.py::test_each_transition_is_allowed_from_its_states_and_refused"
               "_from_every_other",)),
    Break("a worker stops in bounded time without its broker", "worker_tasks/worker.py",
          "    shutdown,  # noqa: F401  (a stopping worker exits in bounded time)\n", "",
          (T + "test_reliability.py::"
               "test_a_worker_stops_in_bounded_time_when_its_broker_is_gone",)),
    Break("a SIGKILLed local leaves no Redis directory", "coordinator/redis_server.py",
          "command = wrapped(command, signal.SIGTERM, remove=str(self.dir))",
          "command = wrapped(command, signal.SIGTERM)",
          (T + "test_reliability.py::test_local_sigkilled_as_its_first_short_job_runs_leaves"
               "_nothing",
           T + "test_reliability.py::"
               "test_a_sigkilled_local_coordinator_takes_its_cluster_with_it")),
    Break("status finds the per-GPU workers of a node", "coordinator/cli/runs.py",
          'workers = ", ".join(served.get(node, [])) or "no worker running"',
          'workers = ", ".join(name for name in served.get(node, []) if "gpu" not in name) '
          'or "no worker running"',
          (T + "test_cluster_view.py::test_status_finds_the_per_gpu_workers_of_a_node",)),
    Break("--balance leaves pinned jobs on their node", "coordinator/plan.py",
          "node = job.node if job.pin else placement.place(job.job_id, job.node)",
          "node = placement.place(job.job_id, job.node)",
          (T + "test_placement.py::test_a_pinned_job_never_leaves_its_node_in_a_balanced_run",)),
    Break("a floating job runs with its slot's own GPU", "worker_tasks/spec.py",
          "gpu_id=self.gpu_id if gpu is None else gpu, per_gpu=gpu is not None)",
          "gpu_id=self.gpu_id, per_gpu=gpu is not None)",
          (T + "test_placement.py::test_per_gpu_floating_jobs_get_their_slots_gpu",)),
    Break("retry of a failed floating job floats again", "coordinator/submission.py",
          '        if record.get("floating") and "node" not in update:\n            update',
          '        if False:\n            update',
          (T + "test_placement.py::test_retry_of_a_failed_floating_job_floats_again_and_move"
               "_leaves_it",)),
    Break("a second worker for a node is refused unless --force", "coordinator/node_worker.py",
          "        if others and not force:", "        if others:",
          (T + "test_promises.py::test_a_second_worker_is_refused_unless_forced",)),
    Break("passwords are masked in output", "coordinator/broker.py",
          '    return re.sub(r"(://[^:/@;]*:)[^@;]*@", r"\\1***@", url)', "    return url",
          (T + "test_promises.py::test_broker_before_the_command_and_a_masked_password",
           T + "test_faults.py::test_passwords_are_masked_in_errors")),
    Break("--dry-run publishes nothing", "coordinator/cli/runs.py",
          "        print_plan(plan)\n        return ExitCode.OK\n    recovering",
          "        print_plan(plan)\n    recovering",
          (T + "test_promises.py::"
               "test_scripts_coordinator_dry_run_prints_the_plan_and_publishes_nothing",)),
    Break("SC_RUN_TTL is honoured", "worker_tasks/tracking.py",
          'int(os.environ.get("SC_RUN_TTL", str(7 * 24 * 3600)))', "int(7 * 24 * 3600)",
          (T + "test_promises.py::test_connect_timeout_run_ttl_and_key_prefix_are_honoured",)),
    Break("SC_CONNECT_TIMEOUT is honoured", "coordinator/broker.py",
          'CONNECT_TIMEOUT_S = float(os.environ.get("SC_CONNECT_TIMEOUT", "3"))',
          "CONNECT_TIMEOUT_S = 3.0",
          (T + "test_promises.py::test_connect_timeout_run_ttl_and_key_prefix_are_honoured",)),
    Break("SC_KEY_PREFIX is honoured", "worker_tasks/tracking.py",
          'KEY_PREFIX = os.environ.get("SC_KEY_PREFIX", "sc")', 'KEY_PREFIX = "sc"',
          (T + "test_promises.py::test_connect_timeout_run_ttl_and_key_prefix_are_honoured",)),
    Break("wait(on_progress=...) is called with each change", "coordinator/follow.py",
          "        if changed and on_progress is not None:", "        if False:",
          (T + "test_promises.py::test_the_python_api_cancels_retries_reports_progress",)),
    Break("legacy jobs without an id are numbered from legacy_0000", "coordinator/jobs.py",
          '{"job_id": f"legacy_{index:04d}"}', '{"job_id": f"legacy_{index + 1:04d}"}',
          (T + "test_promises.py::test_legacy_skip_automatic_ids_and_a_history_path",)),
    Break("a pickled message is refused by a real worker", "celeryconfig.py",
          '\naccept_content = ["json", "application/data"]',
          '\naccept_content = ["json", "application/data", "pickle"]',
          (T + "test_reliability.py::test_hostile_messages_are_refused_and_the_worker_lives_on",),
          # Celery will not start a root worker that accepts pickle unless told to.
          env=(("C_FORCE_ROOT", "1"),)),
    Break("a legacy job's skip reaches the scoring script", "coordinator/legacy.py",
          '    if entry.skip:\n        args += ["--skip", str(entry.skip)]\n', "",
          (T + "test_promises.py::test_legacy_skip_automatic_ids_and_a_history_path",)),
    Break("README command 1 finds the secret seed", "coordinator/cli/workload.py",
          'secret = json.loads(demo.secret.read_text())["secret_seed"]', "secret = -1",
          (T + "test_promises.py::test_readme_command_1_demo_script",)),
    Break("a marker or log path with the wrong ending is refused", "worker_tasks/spec.py",
          '        if not done.endswith(".done") or not log.endswith(".log"):',
          "        if False:",
          (T + "test_worker_rules.py::test_every_field_of_a_message_is_checked",)),
    Break("a SIGKILLed coordinator local takes its Redis and workers with it",
          "coordinator/cli/node.py", "die_with_parent=True,\n",
          "die_with_parent=False,\n",
          (T + "test_reliability.py::"
               "test_a_sigkilled_local_coordinator_takes_its_cluster_with_it",)),
    Break("wait publishes a job whose message vanished again, once", "coordinator/scheduler.py",
          "        again = [job_id for job_id in lost if job_id not in self.published_again\n"
          "                 and self.options.republish_lost]",
          "        again: list[str] = []",
          (T + "test_reliability.py::test_wait_publishes_a_vanished_message_again_once",)),
    Break("status marks lost jobs and publishes nothing", "coordinator/run.py",
          "notice=lines.append, republish_lost=False)", "notice=lines.append)",
          (T + "test_reliability.py::"
               "test_purged_messages_make_jobs_lost_and_retry_lost_runs_them",)),
    Break("followers learn a job's new task id", "coordinator/follow.py",
          '("attempts", "host", "duration_s", "error", "task_id", "node")',
          '("attempts", "host", "duration_s", "error", "node")',
          (T + "test_reliability.py::test_wait_publishes_a_vanished_message_again_once",)),
    Break("worker --stop finds a worker that Celery retitled", "worker_tasks/daemon.py",
          'marker.encode() in re.split(rb"[\\0\\s(),]+", cmdline)',
          'marker.encode() in cmdline.split(b"\\0")',
          (T + "test_worker_rules.py::"
               "test_a_pid_file_finds_its_worker_even_when_celery_retitles_it",
           T + "test_promises.py::test_a_second_worker_is_refused_unless_forced")),
    # Flower reads FLOWER_BASIC_AUTH itself: the password is lost only if Flower is started
    # without it and with its API opened (as on loopback without a password).
    Break("Flower's API needs the password when one is set", "coordinator/cli/observe.py",
          "    env = dict(os.environ, SC_BROKER_URL=url)\n    if not auth:",
          "    env = {k: v for k, v in os.environ.items() if k != AUTH_VARIABLE}\n"
          "    env[\"SC_BROKER_URL\"] = url\n    if True:",
          (T + "test_observe.py::test_flower_refuses_without_a_password",)),
    Break("the collector looks where the run's workers wrote", "coordinator/records.py",
          "        used = {job.workdir for job in self.jobs if job.workdir}",
          "        used = set()",
          (T + "test_newcomer.py::test_results_are_judged_where_the_workers_wrote_them",)),
    Break("a .done not where the collector looks is unconfirmed, not failed",
          "coordinator/collector.py",
          "        return replace(job, error=unconfirmed_reason(job, marker)), False",
          "        return replace(job, state=JobState.FAILED, error=unconfirmed_reason(job, "
          "marker)), True",
          (T + "test_newcomer.py::test_a_marker_not_where_the_collector_looks_is_unconfirmed",
           T + "test_exit_statuses.py::test_each_run_command_reaches_each_status_it_lists")),
    Break("a failed job's Flower page reads like its own error", "worker_tasks/run_job.py",
          "            einfo.traceback = exc.report",
          "            pass",
          (T + "test_observe.py::test_flower_shows_workers_with_their_queues_and_every_job",)),
    Break("Flower lists a queued job from its grouped task-sent event",
          "coordinator/submission.py",
          "                        publish_sent_events(dispatcher, producer, [job.event for job "
          "in jobs])",
          "                        pass",
          (T + "test_observe.py::test_flower_shows_workers_with_their_queues_and_every_job",)),
    Break("tracking and presence follow a Sentinel failover", "worker_tasks/connections.py",
          "    return sentinel.master_for(sentinel_master(), db=address.db, username=address."
          "username,\n                               password=address.password)",
          "    host, port = sentinel.discover_master(sentinel_master())\n"
          "    return redis.Redis(host=host, port=port, db=address.db, "
          "password=address.password, **options)",
          (T + "test_failover.py::test_a_run_completes_when_its_master_dies_for_good",)),
    Break("publishing goes on through a failover", "coordinator/submission.py",
          "            if not new_master_within(app.conf.broker_url, deadline):",
          "            if True:",
          (T + "test_failover.py::test_a_failover_while_a_run_is_published_loses_no_job",)),
    Break("a re-started scripts-coordinator follows its run", "coordinator/cli/runs.py",
          '    resuming = not recovering and not getattr(args, "new_run", True)',
          "    resuming = False",
          (T + "test_failover.py::test_the_original_command_started_again_resumes_its_run",)),
    Break("a worker with a trust store runs only signed jobs", "worker_tasks/admission.py",
          "    if content_type != SIGNED_CONTENT_TYPE:",
          "    if False:",
          (T + "test_signing.py::test_unsigned_and_foreign_jobs_are_refused_in_one_line",
           T + "test_signing.py::test_a_job_sent_through_flowers_task_api_is_refused")),
    Break("a signed message re-routed to another node is refused", "worker_tasks/admission.py",
          "    if queue not in queues:",
          "    if False:",
          (T + "test_signing.py::test_an_altered_or_rerouted_signed_message_is_refused",)),
    Break("a signed message runs only under the task id it was signed with",
          "worker_tasks/admission.py",
          '    if job.get("task_id") != headers.get("id"):',
          "    if False:",
          (T + "test_signing.py::test_an_altered_or_rerouted_signed_message_is_refused",)),
    Break("a rotated trust store is read again", "worker_tasks/admission.py",
          "        reload_if_changed(store)",
          "        pass",
          (T + "test_signing.py::test_rotation_refuses_no_job_and_then_the_old_key",)),
    Break("the workers' Redis user can do nothing of @dangerous", "docs/cluster.md",
          "'+@all' '-@dangerous'", "'+@all'",
          (T + "test_acl.py::test_the_workers_user_runs_jobs_and_nothing_dangerous",)),
    Break("rediss:// clients verify the server against $SC_REDIS_CA", "worker_tasks/connections.py",
          "            options = {**tls_options(), **options}",
          "            options = {**options}",
          (T + "test_tls.py::test_a_whole_run_over_tls",)),
    Break("a plain-text client of a TLS-only Redis is told to use rediss://",
          "coordinator/broker.py",
          '        return " (a TLS-only Redis refuses plain text: use a rediss:// URL)"',
          '        return ""',
          (T + "test_tls.py::test_plain_text_and_a_wrong_ca_are_one_line_each",)),
    Break("status exits 1 once a job failed", "coordinator/records.py",
          "        return any(job.state in RETRYABLE for job in self.jobs)",
          "        return False",
          (T + "test_exit_statuses.py::test_each_run_command_reaches_each_status_it_lists",)),
    Break("SIGTERM stops the suite's servers and workers", "tests/conftest.py",
          "    signal.signal(signal.SIGTERM, _interrupt)\n",
          "    pass\n",
          (T + "test_newcomer.py::test_an_interrupted_suite_stops_every_server_and_worker_it_"
               "started[SIGTERM]",)),
    Break("a hand-made message cannot write lines into the worker's log",
          "worker_tasks/consumer.py", "            clean_headers(message)\n",
          "            pass\n",
          (T + "test_head_refusals.py::"
               "test_a_hand_made_message_cannot_write_lines_into_the_worker_log",)),
    Break("a warm job runs with the script's directory as sys.path[0]",
          "worker_tasks/forked_script.py",
          "    sys.path[0] = os.path.dirname(os.path.realpath(script))\n", "",
          (T + "test_warm.py::test_a_warm_job_sees_what_a_cold_one_sees",)),
    Break("a warm job's traceback is the script's own", "worker_tasks/forked_script.py",
          "    while tb is not None and tb.tb_frame.f_code.co_filename != script:\n"
          "        tb = tb.tb_next\n", "",
          (T + "test_warm.py::test_warm_and_cold_jobs_end_with_the_same_statuses",)),
    Break("a warm job's exit clears its globals, so what they held is freed as in a cold exit",
          "worker_tasks/forked_script.py", "        clear_globals(main.__dict__)\n",
          "        pass\n",
          (T + "test_warm.py::test_a_warm_job_writes_out_the_files_it_left_open_as_a_cold_"
               "one_does",)),
    Break("a warm job's exit closes the files left open in a preloaded module",
          "worker_tasks/forked_script.py", "                file.close()\n",
          "                file.flush()\n",
          (T + "test_warm.py::test_a_warm_job_writes_out_the_files_it_left_open_as_a_cold_"
               "one_does",)),
    Break("a warm job's exit closes outer files before the files under them",
          "worker_tasks/forked_script.py", "    files.sort(key=file_layer)\n", "",
          (T + "test_warm.py::test_a_warm_job_writes_out_the_files_it_left_open_as_a_cold_"
               "one_does",)),
    Break("a warm job ended by KeyboardInterrupt writes out its files first",
          "worker_tasks/forked_script.py", "        finish(1, main, imported_before)\n", "",
          (T + "test_warm.py::test_a_warm_job_writes_out_the_files_it_left_open_as_a_cold_"
               "one_does",)),
    Break("a warm job's uncaught exception goes to the script's sys.excepthook",
          "worker_tasks/forked_script.py", "    if sys.excepthook is not sys.__excepthook__:\n",
          "    if False:\n",
          (T + "test_warm.py::test_warm_and_cold_jobs_end_with_the_same_statuses",)),
    Break("a warm zip application runs its archive's __main__",
          "worker_tasks/forked_script.py",
          "    if ZIP_END in source[-ZIP_TAIL_BYTES:]:", "    if False:",
          (T + "test_warm.py::test_a_zip_application_runs_warm_as_python_runs_it",)),
    Break("a warm job's module is what python script.py makes", "worker_tasks/forked_script.py",
          "                         __loader__=SourceFileLoader(\"__main__\", script))\n",
          "                         __loader__=None)\n",
          (T + "test_warm.py::test_a_warm_job_sees_what_a_cold_one_sees",)),
    Break("a warm job dies when the pool process waiting for it goes", "worker_tasks/runner.py",
          "            if closed:\n                os.kill(os.getpid(), signal.SIGTERM)",
          "            if closed:\n                select.select([script_fd], [], [])",
          (T + "test_warm.py::test_a_killed_worker_takes_its_warm_job_and_a_failed_preload_"
               "runs_jobs_cold",)),
    Break("a failed preload runs jobs cold", "worker_tasks/zygote.py",
          "    ready = not failed and threads == 1", "    ready = threads == 1",
          (T + "test_warm.py::test_a_killed_worker_takes_its_warm_job_and_a_failed_preload_"
               "runs_jobs_cold",)),
    Break("a warm worker scores Step 3 with the engine it loaded ahead", "scoring/cpu.py",
          "COMPILED_MIN_WORK_LOADED if compiled_loaded() else", "COMPILED_MIN_WORK if False else",
          (T + "test_warm.py::test_step3_on_a_warm_worker_scores_with_the_engine_loaded_ahead",)),
    Break("a warm stop of a node signals every GPU worker first", "worker_tasks/daemon.py",
          "        waiting.append((state.pid, pidfile, marker, busy, index))\n",
          "        waiting.append((state.pid, pidfile, marker, busy, index))\n"
          "        while process_matches(state.pid, marker):\n"
          "            time.sleep(STOP_POLL_S)\n",
          (T + "test_per_gpu_workers.py::test_a_warm_stop_of_the_node_signals_every_gpu_worker_"
               "before_waiting",)),
    Break("per-node and per-GPU workers of one node refuse each other",
          "coordinator/node_worker.py",
          "                 or whole != (gpu_of_slot(slot_of_worker(name)) is None)]",
          "                 ]",
          (T + "test_per_gpu_workers.py::test_per_node_and_per_gpu_workers_of_one_node_refuse_"
               "each_other",)),
    Break("submit says when a node's workers are of the other kind", "coordinator/run.py",
          "            return node in served and (is_floating(node) or slot in serving_slots)",
          "            return node in served",
          (T + "test_per_gpu_workers.py::test_submit_says_when_the_nodes_workers_are_of_the_"
               "other_kind",)),
    Break("deploy --project installs the node's extras", "coordinator/cluster/deploy.py",
          "    extras = node.config.extras\n", "    extras = ()\n",
          (T + "test_ssh_cluster.py::test_deploy_project_installs_this_build_with_the_nodes_"
               "python",)),
    Break("cluster up --per-gpu starts a worker per GPU", "coordinator/cluster/inventory.py",
          "        return [slot_of(self.label, gpu) for gpu in range(self.config.gpus)]",
          "        return [slot_of(self.label, 0)]",
          (T + "test_cluster_section.py::test_the_cluster_section_runs_as_written_from_an_empty_"
               "head_directory",)),
    Break("an unsigned command that changes a worker is refused", "worker_tasks/mailbox.py",
          "            if method in UNSIGNED_COMMANDS:\n                return None",
          "            if True:\n                return None",
          (T + "test_signing.py::test_a_command_that_changes_a_worker_needs_the_heads_signature",
           T + "test_signing.py::test_a_job_sent_through_flowers_task_api_is_refused")),
    Break("a copy of a signed command sent again is refused", "worker_tasks/mailbox.py",
          "        if not isinstance(nonce, str) or nonce in self._nonces:",
          "        if not isinstance(nonce, str):",
          (T + "test_signing.py::test_a_signed_command_runs_once_and_only_while_fresh",)),
    Break("a signed command made long ago is refused", "worker_tasks/mailbox.py",
          "abs(time.time() - sent_at) > FRESH_S:", "False:",
          (T + "test_signing.py::test_a_signed_command_runs_once_and_only_while_fresh",)),
    Break("the head skips replies its node certificates do not verify",
          "worker_tasks/mailbox.py",
          "            body = message.decode()\n"
          "        except Exception as err:  # SecurityError: an",
          "            body = (loads(*signing.read_unverified(message.body), force=True)\n"
          "                    if is_signed(message) else message.decode())\n"
          "        except Exception as err:  # SecurityError: an",
          (T + "test_signing.py::test_the_head_takes_only_replies_its_node_certificates_verify",
           T + "test_ssh_cluster.py::test_step3_over_ssh_from_init_to_down")),
    Break("the head skips unsigned replies once it holds node certificates",
          "worker_tasks/mailbox.py",
          "            if store is not None and not is_signed(message):",
          "            if False:",
          (T + "test_signing.py::test_the_head_takes_only_replies_its_node_certificates_verify",)),
    Break("cluster up starts each worker with its node's own key", "coordinator/cluster/workers.py",
          '        env[signing.KEY_VARIABLE] = f"{keys}.key"',
          "        pass",
          (T + "test_ssh_cluster.py::test_step3_over_ssh_from_init_to_down",)),
    Break("a node's key answers for that node only", "worker_tasks/mailbox.py",
          "            if others:", "            if False:",
          (T + "test_signing.py::test_the_head_takes_only_replies_its_node_certificates_verify",)),
    Break("the makespan counts work, not gaps", "coordinator/collector.py",
          "    makespan = round(busy_time(jobs), 3)",
          "    makespan = round(max(ends) - min(job.started_at or ends[0] for job in jobs), 3) "
          "if ends else 0.0",
          (T + "test_honest_lines.py::test_the_makespan_of_a_retried_run_counts_work_not_the_gap_"
               "before_the_retry",)),
    Break("the headline says how many succeeded jobs were skipped", "coordinator/collector.py",
          '    of_them = f", {skipped} of them skipped (their .done existed)" if skipped else ""',
          '    of_them = ""',
          (T + "test_honest_lines.py::test_a_resumed_runs_headline_adds_up_with_its_table",)),
    Break("progress counts from 0", "coordinator/progress.py",
          'f"  ({len(self.ended)}/{status.total})', 'f"  ({status.done}/{status.total})',
          (T + "test_honest_lines.py::test_progress_lines_count_from_zero_one_end_at_a_time",)),
    Break("a broker that holds nothing of ours is named before the first publish",
          "coordinator/run.py", "    if not holds_ours(client):", "    if False:",
          (T + "test_local_cluster.py::test_a_broker_nobody_serves_is_named_and_not_waited_on_"
               "for_ever",)),
    Break("--wait gives up when no worker serves the run", "coordinator/follow.py",
          "        if unserved is not None:\n", "        if False:\n",
          (T + "test_local_cluster.py::test_a_broker_nobody_serves_is_named_and_not_waited_on_"
               "for_ever",)),
    Break("a missing script is refused at submit where the scripts are in sight",
          "coordinator/plan.py", "        if options.scripts_dir is not None:\n",
          "        if False:\n",
          (T + "test_head_refusals.py::test_a_missing_script_is_refused_at_submit_where_the_"
               "scripts_are_in_sight",
           T + "test_local.py::test_local_refuses_bad_input_before_starting_anything")),
    Break("with a local cluster up, no broker named means that cluster",
          "coordinator/broker.py",
          '    url = url or os.environ.get("SC_BROKER_URL") or standing() or celeryconfig.'
          'broker_url',
          '    url = url or os.environ.get("SC_BROKER_URL") or celeryconfig.broker_url',
          (T + "test_python_api_page.py::test_the_python_api_page_runs_as_written_from_an_empty_"
               "directory",)),
    Break("local --down leaves no directory", "coordinator/local.py",
          '    shutil.rmtree(state_path().parent / "logs", ignore_errors=True)\n', "",
          (T + "test_python_api_page.py::test_the_python_api_page_runs_as_written_from_an_empty_"
               "directory",)),
    Break("an unknown field in a job is named", "coordinator/jobs.py",
          "        warnings += unknown_fields(source, index, entry, model, unknown_seen)\n", "",
          (T + "test_head_refusals.py::test_an_unknown_field_is_named_once_and_not_refused",)),
    Break("a failed job's row has its runtime in Flower", "worker_tasks/run_job.py",
          "        if type == \"task-failed\" and self.time_start:", "        if False:",
          (T + "test_observe.py::test_flower_shows_workers_with_their_queues_and_every_job",)),
    Break("deploy --project needs no scripts", "coordinator/cluster/deploy.py",
          "            elif project is None and not data:",
          "            elif True:",
          (T + "test_ssh_cluster.py::test_deploy_project_installs_this_build_with_the_nodes_"
               "python",)),
    Break("no signing line where no worker requires signatures", "coordinator/cli/runs.py",
          "    if service.refusing:  # a line only where a worker requires signatures",
          '    if service.refusing or not status.info.get("signed"):',
          (T + "test_local_cluster.py::test_status_of_an_unsigned_run_where_no_worker_verifies_"
               "says_nothing_of_signing",)),
    Break("a job's runner is named after its job", "worker_tasks/runner.py",
          "                            parent, title=job_title(env))",
          "                            parent)",
          (T + "test_local_cluster.py::test_a_jobs_runner_is_named_after_its_job_in_ps",)),
    Break("cluster status reads queue lengths from the broker", "coordinator/cluster_view.py",
          "        return int(self.broker.llen(queue))",
          "        return int(self.client.llen(queue))",
          (T + "test_ssh_cluster.py::test_cluster_status_reads_queue_lengths_from_the_broker",)),
    Break("a job with \"after\" waits in its hold list, not its queue",
          "coordinator/submission.py",
          "                                 if spec.job_id in held else job.queue)",
          "                                 if False else job.queue)",
          (T + "test_dependencies.py::test_a_job_runs_only_once_every_job_it_names_succeeded",)),
    Break("the worker that ends a job's last dependency releases it, no head needed",
          "worker_tasks/run_job.py",
          "        with contextlib.suppress(redis.RedisError):  # else the head's scheduler "
          "releases\n            after_job(spec)\n", "",
          (T + "test_dependencies.py::test_a_job_runs_only_once_every_job_it_names_succeeded",)),
    Break("a failed dependency ends its dependents, and theirs", "worker_tasks/dependencies.py",
          "        ended: list[str] = []\n", "        return []\n        ended: list[str] = []\n",
          (T + "test_dependencies.py::test_a_failed_dependency_ends_its_dependents_without_"
               "running_them",)),
    Break("a held message moved early by hand runs nothing", "worker_tasks/run_job.py",
          "        if pending:\n            raise Dropped(f\"delivered before",
          "        if False:\n            raise Dropped(f\"delivered before",
          (T + "test_dependencies.py::test_a_held_message_moved_early_by_hand_runs_nothing",)),
    Break("cycles in after are refused at submit", "coordinator/jobs.py",
          "    cycle = find_cycle(waits)\n", "    cycle: list[str] = []\n",
          (T + "test_dependencies.py::test_cycles_and_unknown_ids_are_refused_and_nothing_is_"
               "published",)),
    Break("a run held by --after waits until the runs it names succeeded",
          "worker_tasks/dependencies.py",
          "        if any(outcome == \"active\" for outcome in outcomes.values()):\n"
          "            return None\n", "",
          (T + "test_dependencies.py::test_a_run_after_another_starts_by_itself_once_that_one_"
               "succeeded",)),
    Break("a run after a failed run ends cancelled", "worker_tasks/dependencies.py",
          "            if after[awaited] == AFTER_OK and outcome in (\"failed\", \"cancelled\"):",
          "            if False:",
          (T + "test_dependencies.py::test_a_run_after_a_failed_run_ends_cancelled_and_wait_"
               "says_so",)),
    Break("the worker that ends an awaited run's last job releases its waiters",
          "worker_tasks/run_job.py",
          "    retrying(\"settle waiting runs\", lambda: dependencies().after_run_end("
          "spec.run_id),\n             AFTER_JOB_RETRY_S)\n", "",
          (T + "test_dependencies.py::test_a_run_after_another_starts_by_itself_once_that_one_"
               "succeeded",)),
    Break("--halt soon: no job starts once the condition is met", "worker_tasks/halt.py",
          "    if not halt.reached(counts):\n        return None\n", "    return None\n",
          (T + "test_halt.py::test_halt_soon_starts_no_job_once_enough_failed_and_lets_running_"
               "ones_finish",)),
    Break("--halt now: running jobs are killed too", "worker_tasks/halt.py",
          "    halt_run(tracker, run_id, reason, kill=halt.when == \"now\")",
          "    halt_run(tracker, run_id, reason, kill=False)",
          (T + "test_halt.py::test_halt_now_kills_the_running_jobs_and_leaves_no_process",)),
    Break("--halt ...,success=N ends the run with exit 0", "coordinator/collector.py",
          "            return ExitCode.OK  # --halt ...,success=N: the rest was not needed",
          "            return ExitCode.JOBS_FAILED",
          (T + "test_halt.py::test_halt_on_success_ends_the_run_well_at_the_first_success",)),
    Break("acct counts the CPU of the script's whole process tree", "worker_tasks/runner.py",
          "    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # every process of the tree, "
          "reaped\n",
          "    usage = resource.getrusage(resource.RUSAGE_SELF)\n",
          (T + "test_accounting.py::test_acct_accounts_for_every_attempt_of_the_whole_process_"
               "tree",)),
    Break("coordinator log reads a node-local log on its node", "coordinator/job_log.py",
          "            and not inventory.nodes[node].config.shared_storage:",
          "            and False:",
          (T + "test_ssh_cluster.py::test_a_job_whose_output_cannot_be_fetched_is_named_in_the_"
               "summary",)),
    Break("coordinator log --attempt N shows that attempt only", "coordinator/job_log.py",
          "        if current == attempt:", "        if current:",
          (T + "test_accounting.py::test_log_prints_a_jobs_log_one_attempt_of_it_or_follows_"
               "it",)),
    Break("a \"P%\" timeout kills a job far slower than its script's median",
          "worker_tasks/execution.py", "            self.deadline = self.started + self.seconds",
          "            self.deadline = None",
          (T + "test_adaptive_timeout.py::test_a_percentage_timeout_kills_a_job_far_slower_than_"
               "the_median",)),
    Break("the head that follows a run releases a held job a worker left held",
          "coordinator/scheduler.py", "        if held:\n            self.settle_held(held)\n", "",
          (T + "test_dependencies.py::test_a_release_left_undone_is_done_once_by_the_head_that_"
               "follows",)),
    Break("Flower shows why a halt revoked a job", "worker_tasks/run_job.py",
          "                        exception=revoked_reason(spec, stop.why))",
          "                        exception=stop.why)",
          (T + "test_observe.py::test_flower_shows_why_a_halted_run_revoked_its_jobs",)),
    Break("Flower started after a run shows its jobs", "coordinator/flower_replay.py",
          "                for kind, fields in job_events(job, run_id, before):",
          "                for kind, fields in []:",
          (T + "test_observe.py::test_flower_started_after_a_run_shows_its_jobs_as_they_ended",)),
    Break("jobs scoring --balance deals chunks that shrink", "coordinator/scoring_jobs.py",
          "    return sorted(sizes, reverse=True)\n", "    return sorted(sizes)\n",
          (T + "test_scoring_pipeline.py::test_factoring_deals_chunks_that_shrink_and_hold_every_"
               "seed",)),
    Break("a slot's speed is learned per unit of a job's cost", "worker_tasks/speeds.py",
          "        per_unit = max(seconds, 0.0) / cost\n", "        per_unit = max(seconds, 0.0)\n",
          (T + "test_speeds.py::test_an_estimate_not_updated_for_a_week_is_forgotten",)),
    Break("the tail of a followed run goes where it finishes first", "coordinator/placement.py",
          "        slot = min(self.free_at, key=lambda name: (\n"
          "            self.free_at[name] + cost * self.seconds_per_unit[name], name))",
          "        slot = max(self.free_at, key=lambda name: (\n"
          "            self.free_at[name] + cost * self.seconds_per_unit[name], name))",
          (T + "test_speeds.py::test_the_tail_goes_where_it_finishes_first_and_a_slow_slot_"
               "stays_idle",)),
    Break("a straggler gets a backup copy on an idle slot", "coordinator/placement.py",
          "        if time_left(job, seconds_per_unit) > COPY_MARGIN * there:",
          "        if time_left(job, seconds_per_unit) > 1e9 * there:",
          (T + "test_speculation.py::test_a_straggler_gets_a_copy_on_the_idle_slot_and_the_"
               "copy_wins",)),
    Break("the first execution to succeed takes the job, once", "worker_tasks/tracking.py",
          "  if not waiting then return {'refused', current, attempts} end\n"
          "  if not took_over and state == 'running' then",
          "  if not took_over and state == 'running' then",
          (T + "test_tracking.py::test_the_copy_that_claims_first_takes_the_job_and_the_"
               "original_is_superseded",)),
    Break("the loser is killed and its execution kept as superseded", "worker_tasks/tracking.py",
          "  supersede_copy(KEYS[1], state)\n", "",
          (T + "test_tracking.py::test_the_original_that_finishes_first_supersedes_its_copy",
           T + "test_speculation.py::test_the_original_wins_when_it_ends_first_and_the_copy_is_"
               "killed")),
    Break("a copy's output is kept apart until its claim", "worker_tasks/run_job.py",
          "            written = confine(self.base, private_output(spec.output_file, "
          "self.task_id),",
          "            written = confine(self.base, spec.output_file,",
          (T + "test_speculation.py::test_the_winner_killed_between_its_claim_and_its_output_"
               "runs_again",)),
    Break("workers are warm by default", "coordinator/cli/node.py",
          "    return {} if args.cold else worker_settings(args.preload)\n",
          "    return {}\n",
          (T + "test_warm.py::test_local_runs_jobs_warm_by_default_and_cold_with_cold",
           T + "test_warm.py::test_worker_warm_flags")),
    Break("ps names a warm script by its own command line", "worker_tasks/forked_script.py",
          "    name_process(shlex.join(argv), WARM_JOB_NAME)\n", "",
          (T + "test_warm.py::test_worker_warm_flags",)),
    Break("a warm job goes to a runner forked ahead of it", "worker_tasks/warm.py",
          "            reservations.ask(self._socket_path)\n", "            pass\n",
          (T + "test_warm.py::test_a_spare_killed_while_it_waits_is_replaced",)),
    Break("a job goes straight to the spare its pool process reserved", "worker_tasks/warm.py",
          "        connection = self.pending.pop(socket_path, None)\n",
          "        self.pending.pop(socket_path, None)\n        connection = None\n",
          (T + "test_warm.py::test_a_spare_killed_while_it_waits_is_replaced",)),
    Break("a stopping worker waits for its warm jobs, not for its spares",
          "worker_tasks/shutdown.py",
          "    return any(parent in children and (parent not in zygotes or is_warm_job(pid))\n",
          "    return any(parent in children and (parent not in zygotes or True)\n",
          (T + "test_warm.py::test_a_stopping_worker_waits_for_its_warm_jobs_not_for_its_spares",)),
    Break("a stopping worker counts a warm job's runner as a job", "worker_tasks/shutdown.py",
          "    return any(parent in children and (parent not in zygotes or is_warm_job(pid))\n",
          "    return any(parent in children and (parent not in zygotes)\n",
          (T + "test_warm.py::test_a_stopping_worker_waits_for_its_warm_jobs_not_for_its_spares",)),
    Break("a spare whose waiting script process was killed forks another",
          "worker_tasks/zygote.py",
          "    except OSError:  # its waiting process was killed meanwhile: another, forked now\n",
          "    except ZeroDivisionError:\n",
          (T + "test_warm.py::test_a_spare_killed_while_it_waits_is_replaced",)),
    Break("a script that cannot use the preload is forked from the bare zygote",
          "worker_tasks/warm.py",
          "    if bare and not uses_preload(script, preload_modules()):\n",
          "    if False:\n",
          (T + "test_warm.py::test_a_script_that_cannot_use_the_preload_is_forked_from_the_"
               "bare_zygote",)),
    Break("a script that sets an import-time variable imports the preload itself",
          "worker_tasks/warm.py", "    if source.names_import_time_env:\n        return False\n",
          "",
          (T + "test_warm.py::test_a_script_that_sets_an_import_time_variable_imports_the_"
               "preload_itself",
           T + "test_worker_rules.py::test_a_script_uses_the_preload_unless_it_imports_only_"
               "the_rest_of_the_stdlib")),
    Break("a script that imports a preloaded module uses the preload", "worker_tasks/warm.py",
          "    return not (source.imports <= STANDARD_LIBRARY) or bool(source.imports & "
          "preloaded)\n",
          "    return not (source.imports <= STANDARD_LIBRARY)\n",
          (T + "test_worker_rules.py::test_a_script_uses_the_preload_unless_it_imports_only_"
               "the_rest_of_the_stdlib", T + "test_warm.py::test_a_script_that_cannot_use_the_"
                                             "preload_is_forked_from_the_bare_zygote")),
    Break("a job just past its estimate is ending, not a straggler's", "coordinator/placement.py",
          "    return 0.0 if job.elapsed_s <= expected * (1 + ENDING_MARGIN) else job.elapsed_s\n",
          "    return job.elapsed_s\n",
          (T + "test_placement.py::test_a_fast_slot_whose_job_is_just_past_its_estimate_is_"
               "about_to_be_free",)),
    Break("a message delivered again while its job runs elsewhere waits for it",
          "worker_tasks/execution.py",
          "        return slot if holder == self.task_id else None\n",
          "        return None\n",
          (T + "test_reliability.py::test_a_job_longer_than_the_visibility_timeout_runs_once",)),
    Break("an item in a queue that is no message does not end the worker",
          "worker_tasks/celery_app.py", "    install_transports()\n", "",
          (T + "test_reliability.py::test_a_raw_item_that_is_no_message_is_dropped_and_the_"
               "worker_lives_on",)),
    Break("a dropped item's log line names its queue", "worker_tasks/transport.py",
          "            drop(self._queue_cycle.last, ", "            drop(None, ",
          (T + "test_reliability.py::test_a_raw_item_that_is_no_message_is_dropped_and_the_"
               "worker_lives_on",)),
    Break("the CLI reaches the worker's side only through the head's rooms",
          "coordinator/cli/node.py",
          "    from coordinator.node_worker import NodeWorker, load_env_file\n",
          "    from coordinator.node_worker import NodeWorker, load_env_file\n"
          "    from worker_tasks import daemon  # noqa: F401\n",
          (T + "test_layout.py::test_the_cli_imports_few_modules_of_the_product",)),
    Break("the head returns a dead attempt's message at once", "coordinator/scheduler.py",
          "        for line in return_dead_messages(self.client, self.app, fresh):\n",
          "        for line in []:\n",
          (T + "test_reliability.py::test_a_killed_workers_job_runs_once_its_node_is_back_"
               "not_after_the_visibility_timeout",)),
    Break("a live delivery of a dead attempt's message stays", "coordinator/reconcile.py",
          "            if delivered is None or delivered > delivered_before[task_id]:\n",
          "            if delivered is None:\n",
          (T + "test_reliability.py::test_only_a_message_delivered_before_the_dead_attempt_"
               "started_goes_back",)),
    Break("a tail job placed on a slot that died floats again", "coordinator/reconcile.py",
          "                and not is_floating(job.node) and job.node not in live]\n",
          "                and False]\n",
          (T + "test_placement.py::test_a_tail_job_placed_on_a_node_that_dies_goes_back_to_"
               "the_shared_queue",)),
    Break("a worker frozen past its lease keeps its message", "coordinator/reconcile.py",
          'RETURN_AFTER_S = float(os.environ.get("SC_RETURN_AFTER", "60"))',
          'RETURN_AFTER_S = float(os.environ.get("SC_RETURN_AFTER", "0"))',
          (T + "test_placement.py::test_a_worker_frozen_past_its_lease_wakes_and_no_second_"
               "delivery_runs_beside_it",)),
    Break("returning messages with the broker away raises nothing", "coordinator/reconcile.py",
          "    except (OperationalError, redis.RedisError) as err:  # the next settle tries "
          "again\n",
          "    except ZeroDivisionError as err:\n",
          (T + "test_reliability.py::test_returning_messages_while_the_broker_is_away_returns_"
               "none_and_raises_nothing",)),
    Break("a woken worker stops its overtaken attempt", "worker_tasks/execution.py",
          "        return bool(mine) and isinstance(theirs, int) and theirs > mine\n",
          "        return False\n",
          (T + "test_placement.py::test_a_worker_frozen_past_the_grace_wakes_and_stops_its_"
               "overtaken_attempt",)),
    Break("an overtaken attempt claims nothing", "worker_tasks/tracking.py",
          "if ARGV[10] ~= '' and on and on ~= tonumber(ARGV[10]) then\n",
          "if false then\n",
          (T + "test_placement.py::test_an_overtaken_attempt_that_succeeded_while_frozen_writes_"
               "no_marker", T + "test_tracking.py::test_an_overtaken_attempt_ends_nothing")),
    Break("a script never outlives the loop that watches it", "worker_tasks/run_job.py",
          "                runner.kill()\n            raise\n",
          "                pass\n            raise\n",
          (T + "test_reliability.py::test_a_script_never_outlives_the_loop_that_watches_it",)),
    Break("a record field that is not JSON is read as no field", "worker_tasks/tracking.py",
          "        except orjson.JSONDecodeError:\n            continue\n",
          "        except ZeroDivisionError:\n            continue\n",
          (T + "test_reliability.py::test_a_running_job_edited_by_hand_ends_as_its_script_did",)),
    Break("a record field of the wrong kind is read as no field", "worker_tasks/kinds.py",
          "    origin, args = typing.get_origin(hint), typing.get_args(hint)\n",
          "    return lambda value: True\n",
          (T + "test_faults.py::test_records_edited_by_hand_with_json_of_the_wrong_kind_cost_no_"
               "command_its_life",
           T + "test_reliability.py::test_a_running_job_edited_by_hand_ends_as_its_script_did")),
    Break("a worker killed while its run is busy is seen dead", "coordinator/scheduler.py",
          "            self.settle_running(status, dead_only=True)\n", "            pass\n",
          (T + "test_reliability.py::test_a_worker_killed_while_its_run_is_busy_is_seen_dead_"
               "without_waiting_for_quiet",)),
    Break("a hand-made stream entry is no event", "worker_tasks/tracking.py",
          "        if state is None or not job:\n            return None\n", "",
          (T + "test_tracking.py::test_a_hand_made_stream_entry_is_read_as_no_event_or_without_"
               "its_wrong_fields",)),
    Break("the transitions read a history edited by hand as none", "worker_tasks/tracking.py",
          "  if type(history) ~= 'table' then history = {} end  -- none, or edited by hand\n",
          "",
          (T + "test_reliability.py::test_a_running_job_edited_by_hand_ends_as_its_script_did",)),
    Break("a running job's copy edited by hand is read as none", "worker_tasks/run_job.py",
          "    return (isinstance(copy, dict) and copy.get(\"task_id\") == task_id\n",
          "    return (copy.get(\"task_id\") == task_id\n",
          (T + "test_reliability.py::test_a_running_job_edited_by_hand_ends_as_its_script_did",)),
    Break("a slot speed edited by hand is measured afresh", "worker_tasks/speeds.py",
          "            continue  # edited by hand: as if never measured\n",
          "            raise ValueError(entry)\n",
          (T + "test_reliability.py::test_a_running_job_edited_by_hand_ends_as_its_script_did",)),
    Break("a slot's speed edited by hand is learned again", "worker_tasks/speeds.py",
          "if ok and type(old) == 'table' and type(old.at) == 'number' and type(old.spu) == "
          "'number'\n    and type(old.n) == 'number' then",
          "if raw then",
          (T + "test_reliability.py::test_a_running_job_edited_by_hand_ends_as_its_script_did",)),
    Break("a message of the wrong shape ends no worker", "worker_tasks/admission.py",
          "        return shape_refusal(message, body)\n",
          "        return None\n",
          (T + "test_reliability.py::test_a_message_of_the_wrong_shape_is_refused_and_the_"
               "worker_lives_on",)),
    Break("a broker error in the scheduler costs wait a notice", "coordinator/follow.py",
          "            except OperationalError as err:  # kombu's: publishing or asking the "
          "workers\n",
          "            except ZeroDivisionError as err:\n",
          (T + "test_reliability.py::test_a_broker_that_fails_the_scheduler_costs_wait_a_notice_"
               "not_its_life",)),
    Break("a kombu error ends a command in one line", "coordinator/cli/common.py",
          "    except (redis_error(), kombu_error()) as err:",
          "    except redis_error() as err:",
          (T + "test_faults.py::test_a_broker_error_from_kombu_mid_command_is_one_line_and_"
               "exit_3",)),
    Break("a follower reads a burst of transitions in one poll", "coordinator/follow.py",
          "        if changed and block and not self.over():",
          "        if False:",
          (T + "test_in_process.py::test_a_follower_reads_a_burst_of_transitions_in_one_poll",)),
    Break("a follower tells a run's end without reading on", "coordinator/follow.py",
          "        if changed and block and not self.over():",
          "        if changed and block:",
          (T + "test_in_process.py::test_a_follower_tells_the_end_of_a_run_without_reading_on",)),
]


def run_tests(scratch: Path, tests: list[str], timeout: float,
              extra_env: tuple[tuple[str, str], ...] = ()) -> tuple[int, str]:
    """Run ``tests`` against the scratch copy; (pytest's exit status, its summary lines).

    The summary: the ``FAILED`` lines (the test and its first error line), then the last.
    """
    env = dict(os.environ, PYTHONPATH=str(scratch), PYTHONDONTWRITEBYTECODE="1",
               **dict(extra_env))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider",
         f"--basetemp={scratch / TEMP_DIR}", *tests],
        cwd=scratch, env=env, capture_output=True, text=True, timeout=timeout)
    lines = result.stdout.strip().splitlines() or ["(no output)"]
    failed = [line[:300] for line in lines if line.startswith("FAILED ")]
    return result.returncode, "\n  ".join([*failed, lines[-1]])


def stayed_green(tests: list[str], summary: str) -> list[str]:
    """The named tests with no FAILED line (a parametrized test: any of its cases)."""
    failed = [line.removeprefix("FAILED ").strip() for line in summary.split("\n  ")
              if line.startswith("FAILED ")]
    return [test for test in tests if not any(
        line == test or line.startswith((test + " ", test + "[")) for line in failed)]


def kill_leftovers(scratch: Path) -> int:
    """SIGKILL whatever the scratch copy's tests left running; returns how many.

    A broken "nothing outlives" promise leaks by definition. The tests run in the
    scratch copy with their temporary directories inside it, so everything they start
    works there (its environment is no guide: Celery's new process title overwrites it).
    """
    killed = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if Path(os.readlink(entry / "cwd")).is_relative_to(scratch):
                os.kill(int(entry.name), signal.SIGKILL)
                killed += 1
        except (OSError, ValueError):
            continue
    return killed


def check(item: Break, scratch: Path) -> tuple[bool, str]:
    """Apply one break in ``scratch``, run its tests, restore; (red, summary line)."""
    target = scratch / item.path
    original = target.read_text()
    if original.count(item.old) != 1:
        return False, f"the text to break is not in {item.path} exactly once (code changed?)"
    target.write_text(original.replace(item.old, item.new))
    try:
        status, last = run_tests(scratch, list(item.tests), BREAK_TIMEOUT_S, item.env)
        # Only a failed test counts: an error in a fixture (a worker that would not start)
        # says nothing about the promise. Every test named for the promise must go red:
        # one that stays green does not prove what its name says.
        green = stayed_green(list(item.tests), last)
        if green:
            last += "\n  stayed green: " + ", ".join(green)
        return status == 1 and not green, last
    except subprocess.TimeoutExpired:
        return True, f"timed out after {BREAK_TIMEOUT_S} s (counts as red)"
    finally:
        target.write_text(original)
        kill_leftovers(scratch)


def main(argv: list[str]) -> int:
    chosen = [item for item in BREAKS if not argv or any(word in item.promise for word in argv)]
    if not chosen:
        print(f"no promise matches {' '.join(argv)!r}", file=sys.stderr)
        return 2
    survivors = 0
    with tempfile.TemporaryDirectory(prefix="sc-break-") as temp:
        scratch = Path(temp) / "repo"
        shutil.copytree(REPO, scratch, ignore=IGNORED, symlinks=True)
        # A red test means something only if the same test is green on the unbroken copy.
        baseline = sorted({test for item in chosen for test in item.tests})
        status, last = run_tests(scratch, baseline, BREAK_TIMEOUT_S * 2)
        print(f"baseline: {len(baseline)} tests on the unbroken copy: {last}", flush=True)
        if status != 0:
            print("break_promises: the tests fail without any break; fix that first",
                  file=sys.stderr)
            return 2
        for item in chosen:
            started = time.monotonic()
            red, last = check(item, scratch)
            survivors += not red
            print(f"{'red ' if red else 'GREEN'}  {item.promise}  "
                  f"({time.monotonic() - started:.0f} s: {last})", flush=True)
    print(f"{len(chosen) - survivors}/{len(chosen)} broken promises caught by their tests")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
