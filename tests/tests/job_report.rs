//! A job's report through the real agent: a simulated GitHub job (whose repository name is
//! HTML) reads a credential, connects to a loopback listener and reads the Runner.Worker's
//! environment; `runner-monitor report --job ID` over the control socket shows all of it, and a
//! real headless Chromium (Debian's `chromium`) renders `/jobs` and `/jobs/ID` from the agent's
//! HTTP endpoint: the finding is in the DOM text, the hostile name is text (no script element),
//! the canary is nowhere. The screenshot is kept in `target/tmp/job_report/`.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use integration_tests::{
    CANARY, TestEnv,
    live::{agent, assert_no_secret, curl, github_job, run_id, target_dir, wait_alert},
    output_of,
};
use serde_json::Value;

/// Where this test leaves what it rendered (screenshot, DOM dumps).
fn output_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("job_report");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `runner-monitor report --job ID ARGS` against the test agent; its stdout.
fn report(socket: &Path, id: &str, args: &[&str]) -> String {
    let out = output_of(
        Command::new(target_dir().join("runner-monitor"))
            .args(["report", "--job", id])
            .args(args)
            .env("RUNNER_MONITOR_SOCKET", socket),
    );
    assert!(
        out.status.success(),
        "report failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Headless Chromium on `url` with `what` (`--dump-dom`, `--screenshot=FILE`); its stdout.
fn chromium(url: &str, what: &[String]) -> String {
    let profile = tempdir("chromium-profile");
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1280,1600",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(what)
        .arg(url)
        .output()
        .expect("running chromium (Debian package; `cargo xtask setup` installs it)");
    let _ = std::fs::remove_dir_all(&profile);
    assert!(
        out.status.success(),
        "chromium failed on {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rm-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The text of a DOM dump, tags dropped (what a reader of the page sees).
fn dom_text(dom: &str) -> String {
    let mut text = String::new();
    let mut in_tag = false;
    for c in dom.chars() {
        match c {
            '<' => in_tag = true,
            '>' => {
                in_tag = false;
                text.push(' ');
            }
            c if !in_tag => text.push(c),
            _ => {}
        }
    }
    text
}

#[test]
fn a_jobs_report_on_the_command_line_and_as_a_page_in_chromium() {
    let agent = agent();
    let env = TestEnv::new("live-report");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let run = run_id(1);
    let repository = "acme/<script>document.title='pwned'</script><b>app";
    github_job(
        &env,
        agent,
        &run,
        repository,
        &format!(
            "cat \"$HOME/.aws/credentials\" > /dev/null\n\
             \"$JOB_STEP\" connect-tcp 127.0.0.1:{port}\n\
             sh -c 'cat /proc/$PPID/environ > /dev/null'"
        ),
    );
    let id = format!("{run}/build");
    wait_alert(agent, "process-memory-access", &id, |_| true);

    // The command line, over the control socket.
    let text = report(&agent.socket, &id, &[]);
    assert!(!text.contains(CANARY), "the canary leaked into the report");
    assert!(text.starts_with(&format!("Job {id} (key ")), "{text}");
    assert!(
        text.contains(&format!("repository: {repository}")),
        "{text}"
    );
    assert!(
        text.contains("Runner.Worker (pid "),
        "the tree's root: {text}"
    );
    assert!(text.contains("└─ cat (pid "), "a step under it: {text}");
    assert!(
        text.contains(&format!("aws      file   {}", env.path(".aws/credentials"))),
        "{text}"
    );
    assert!(
        text.contains(&format!("127.0.0.1:{port}  1 connections")),
        "{text}"
    );
    assert!(text.contains("critical process-memory-access"), "{text}");
    let json: Value = serde_json::from_str(&report(&agent.socket, &id, &["--format", "json"]))
        .expect("the JSON report");
    let key = json["key"].as_u64().expect("the job's key");
    assert_eq!(json["job"]["repository"], repository);
    let markdown = report(&agent.socket, &id, &["--format", "markdown"]);
    assert!(
        !markdown.contains(CANARY) && !markdown.contains("<script"),
        "{markdown}"
    );

    // The page, on the agent's --listen address, in a real browser.
    let out = output_dir();
    let list_dom = chromium(
        &format!("http://{}/jobs", agent.http),
        &["--dump-dom".into()],
    );
    std::fs::write(out.join("jobs.html"), &list_dom).unwrap();
    let link = format!("href=\"/jobs/{key:016x}\"");
    assert!(
        list_dom.contains(&link),
        "no link {link} on /jobs: {list_dom}"
    );
    let url = format!("http://{}/jobs/{key:016x}", agent.http);
    let dom = chromium(&url, &["--dump-dom".into()]);
    std::fs::write(out.join("job.html"), &dom).unwrap();
    let screenshot = out.join("job.png");
    let _ = std::fs::remove_file(&screenshot);
    chromium(&url, &[format!("--screenshot={}", screenshot.display())]);
    let png = std::fs::read(&screenshot).expect("chromium wrote the screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "a rendered page"
    );
    eprintln!("screenshot: {}", screenshot.display());

    let seen = dom_text(&dom);
    assert!(seen.contains(&format!("Job {id}")), "{seen}");
    assert!(seen.contains("Findings ("), "{seen}");
    assert!(seen.contains("process-memory-access"), "{seen}");
    assert!(seen.contains("/environ"), "{seen}");
    assert!(
        seen.contains("Runner.Worker (pid"),
        "the process tree: {seen}"
    );
    assert!(seen.contains("127.0.0.1"), "the egress table: {seen}");
    assert!(
        seen.contains("acme/<script>document.title='pwned'</script><b>app")
            || dom.contains("acme/&lt;script&gt;document.title='pwned'&lt;/script&gt;&lt;b&gt;app"),
        "the hostile name is shown as text: {dom}"
    );
    assert!(
        !dom.contains("<script"),
        "a script element on the page: {dom}"
    );
    assert!(!dom.contains("pwned</title>"), "the job's script ran");
    assert!(!dom.contains(CANARY), "the canary leaked onto the page");
    assert!(!list_dom.contains("<script") && !list_dom.contains(CANARY));

    // Read-only: nothing but GET.
    let post = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "POST",
            &url,
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&post.stdout), "405");
    assert!(curl(&url).contains("process-memory-access"));
    assert_no_secret(agent);
}
