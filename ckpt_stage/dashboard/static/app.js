// ckpt-stage dashboard: re-run buttons and polling for the new attempt. Plain JS, no build step.
// Pages are complete without it; it only adds the POST /api/rerun call and the wait for its result.
(function () {
  "use strict";
  const meta = (name) => (document.querySelector('meta[name="' + name + '"]') || {}).content || "";
  const base = meta("ckpt-base");
  const csrf = meta("ckpt-csrf");
  const csrfHeader = meta("ckpt-csrf-header") || "X-CSRF-Token";
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
  const POLL_MS = 1500;
  const POLL_FOR_MS = 30 * 60 * 1000;

  function say(button, text, kind, link) {
    const el = button.parentElement.querySelector(".rerun-status");
    if (!el) return;
    el.className = "rerun-status " + (kind || "");
    el.textContent = text;
    if (link) {
      const a = document.createElement("a");
      a.href = link.href;
      a.textContent = link.text;
      if (link.external) { a.target = "_blank"; a.rel = "noopener"; }
      el.append(" ", a);
    }
  }

  async function getJSON(url) {
    const resp = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
    if (!resp.ok) throw new Error("HTTP " + resp.status);
    return resp.json();
  }

  async function rerun(button) {
    button.disabled = true;
    say(button, "Asking for a re-run…", "busy");
    let resp;
    try {
      resp = await fetch(base + "/api/rerun", {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", Accept: "application/json", [csrfHeader]: csrf },
        body: button.dataset.rerun,
      });
    } catch (err) {
      say(button, "Could not reach the dashboard: " + err, "err");
      button.disabled = false;
      return;
    }
    let data = {};
    try { data = await resp.json(); } catch (err) { /* an empty or non-JSON error body */ }
    if (resp.status === 401) {
      // Standalone: sign in here and come back to this page. Mounted: Airflow's own login page.
      const here = location.pathname.slice(base.length) + location.search;
      const login = meta("ckpt-auth") === "standalone" || !data.login_url
        ? base + "/login?next=" + encodeURIComponent(here) : data.login_url;
      say(button, "Refused: " + (data.detail || "sign in first") + ".", "err", { href: login, text: "Sign in" });
      button.disabled = false;
      return;
    }
    if (!resp.ok) {
      say(button, "Refused (" + resp.status + "): " + (data.detail || resp.statusText), "err");
      button.disabled = false;
      return;
    }
    if (data.mode === "airflow") {
      say(button, "Airflow run " + (data.dag_run_id || "") + " started; waiting for the new attempt…", "busy",
          data.link ? { href: data.link, text: "Open in Airflow ↗", external: true } : null);
    } else {
      say(button, (data.message || "Re-run queued") + "…", "busy");
    }
    if (button.dataset.poll) {
      await waitForAttempt(button);
    } else if (data.job_id) {
      await waitForJob(button, data.job_id);
    } else {
      button.disabled = false;
    }
  }

  // The version page: done when the version records an attempt newer than the one shown.
  async function waitForAttempt(button) {
    const before = parseInt(button.dataset.attempt || "0", 10);
    const deadline = Date.now() + POLL_FOR_MS;
    while (Date.now() < deadline) {
      await sleep(POLL_MS);
      let d;
      try { d = await getJSON(button.dataset.poll); } catch (err) { continue; }
      const st = d.state || {};
      const newest = (d.attempts || [])[0] || {};
      if (st.status === "validating") say(button, "Validating…", "busy");
      if ((st.attempt || 0) > before && st.status !== "validating" && (newest.attempt || 0) > before) {
        say(button, "Attempt " + st.attempt + ": " + st.status + ".", "ok");
        location.reload();
        return;
      }
    }
    say(button, "Still running; reload later to see the result.", "busy");
    button.disabled = false;
  }

  // A filtered list re-run in the dashboard process: follow the job, then refresh the list.
  async function waitForJob(button, jobId) {
    const deadline = Date.now() + POLL_FOR_MS;
    while (Date.now() < deadline) {
      await sleep(POLL_MS);
      let job;
      try { job = await getJSON(base + "/api/rerun/" + encodeURIComponent(jobId)); } catch (err) { continue; }
      const total = (job.versions || []).length;
      if (job.state === "done" || job.state === "failed") {
        say(button, "Re-ran " + job.done + " of " + total + (job.error ? " (" + job.error + ")" : "") + ".",
            job.state === "done" ? "ok" : "err");
        setTimeout(() => location.reload(), 800);
        return;
      }
      say(button, "Re-running: " + job.done + " of " + total + " done…", "busy");
    }
    button.disabled = false;
  }

  document.addEventListener("click", (event) => {
    const button = event.target.closest("[data-rerun]");
    if (button && !button.disabled) {
      event.preventDefault();
      rerun(button);
    }
  });

  // Filters apply as soon as a choice changes (the Filter button stays for keyboards and no-JS).
  document.querySelectorAll(".filters select").forEach((select) => {
    select.addEventListener("change", () => select.form.submit());
  });
})();
