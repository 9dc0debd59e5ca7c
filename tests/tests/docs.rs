//! The documentation shows what the code does: docs/inflight.md's sequence diagram is what
//! resources/lib/trace-to-mermaid makes of the real trace and backend logs next to it.

use std::process::Command;

use integration_tests::repo_root;

#[test]
fn the_inflight_walkthrough_diagram_is_generated_from_its_trace() {
    let docs = repo_root().join("docs");
    let out = Command::new(repo_root().join("resources/lib/trace-to-mermaid"))
        .current_dir(&docs)
        .args([
            "inflight-demo/frontend.trace",
            "--backend-log",
            "inflight-demo/backend-1.log",
            "--backend-log",
            "inflight-demo/backend-2.log",
        ])
        .output()
        .expect("run trace-to-mermaid (python3)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let generated = String::from_utf8(out.stdout).expect("UTF-8 diagram");
    let page = std::fs::read_to_string(docs.join("inflight.md")).expect("docs/inflight.md");
    let block = page
        .split("<!-- generated: begin -->\n```mermaid\n")
        .nth(1)
        .and_then(|rest| rest.split("```\n<!-- generated: end -->").next())
        .expect("docs/inflight.md has no generated diagram block");
    assert_eq!(
        block, generated,
        "docs/inflight.md's diagram is stale: regenerate it with the command the page gives"
    );
    // The diagram shows the story the page tells: a fresh region, a kill, the replay with the
    // same buffer and the used index as base, and the recovery.
    for step in [
        "GET_INFLIGHT_FD",
        "inflight region is fresh",
        "killed (SIGKILL)",
        "SET_INFLIGHT_FD",
        "resubmitting",
        "back after",
    ] {
        assert!(generated.contains(step), "the diagram lacks '{step}'");
    }
    assert_eq!(
        generated.matches("GET_INFLIGHT_FD num_queues").count(),
        1,
        "one GET only"
    );
    assert_eq!(
        generated.matches("SET_INFLIGHT_FD num_queues").count(),
        2,
        "a SET per start"
    );
}
