//! B11: the dashboard in headless Chromium (WebDriver), against a controller and agents
//! run as processes: how long a run's page takes to draw its graph and timeline, from
//! navigation to the drawing, for runs of 2,000 and 10,000 steps; how long opening one
//! layer of the folded 10,000-step graph takes; and how long a line a tool prints takes
//! to show on the open page.

use std::time::Duration;

use baton_common::pb;
use baton_tests::browser::Browser;
use serde_json::json;

use crate::cluster::{Backend, Cluster};
use crate::scenarios::{Options, run_to_end};

/// A run of `layers` × `width` noop steps, each needing the step above it and its
/// neighbour in the previous layer.
fn layered(name: &str, layers: usize, width: usize) -> String {
    let mut steps = Vec::with_capacity(layers * width);
    for l in 0..layers {
        for i in 0..width {
            let needs: Vec<String> = if l == 0 {
                Vec::new()
            } else {
                let mut n = vec![format!("s{}-{i}", l - 1)];
                if i + 1 < width {
                    n.push(format!("s{}-{}", l - 1, i + 1));
                }
                n
            };
            steps.push(json!({"id": format!("s{l}-{i}"), "tool": "noop", "needs": needs}));
        }
    }
    json!({"name": name, "steps": steps}).to_string()
}

/// Opens a run's page and waits until it is drawn: (navigation to drawn, the GetRun
/// fetch within it, the drawing of graph and timeline within it), in ms.
async fn draw(b: &Browser, url: &str) -> anyhow::Result<(f64, f64, f64)> {
    b.goto(url).await;
    b.until("the run to be drawn", "return performance.getEntriesByName('baton:run-drawn').length > 0").await;
    let v = b
        .eval(
            "const d = performance.getEntriesByName('baton:run-drawn')[0];
             const r = performance.getEntriesByName('baton:render')[0];
             return [d.startTime, d.detail.fetchMs, r.duration]",
        )
        .await;
    let f = |i: usize| v[i].as_f64().unwrap_or(f64::NAN);
    Ok((f(0), f(1), f(2)))
}

pub async fn run(o: &Options) -> anyhow::Result<()> {
    if o.backend != Backend::Sqlite {
        eprintln!("B11 runs on SQLite only (the page reads the same API either way)");
    }
    let Some(b) = Browser::start().await else {
        anyhow::bail!("B11 needs chromium and chromedriver (apt-get install chromium chromium-driver)");
    };
    let cluster = Cluster::start(Backend::Sqlite, None, &[8, 8], Duration::from_secs(1), o.pipeline).await?;
    let mut c = cluster.client().await?;
    let base = format!("http://{}", cluster.http);
    println!("## B11: the dashboard in headless Chromium\n");
    println!(
        "| run | nodes drawn | navigation → drawn and painted | GetRun fetch | graph + timeline drawing |"
    );
    println!("|---|---|---|---|---|");
    for (layers, width) in [(20, 100), (50, 200)] {
        let n = layers * width;
        let (_, run_id) = run_to_end(&mut c, layered(&format!("b11-{n}"), layers, width)).await?;
        // The first load warms the browser's caches of the page's own files.
        draw(&b, &format!("{base}/runs/{run_id}")).await?;
        let mut best = (f64::MAX, 0.0, 0.0);
        for _ in 0..3 {
            let d = draw(&b, &format!("{base}/runs/{run_id}")).await?;
            if d.0 < best.0 {
                best = d;
            }
        }
        let nodes = b.eval("return document.querySelectorAll('#graph [data-node]').length").await;
        b.screenshot(&format!("b11-{n}")).await;
        println!(
            "| {n} steps, {layers} layers × {width} (all done) | {} | {:.0} ms | {:.0} ms | {:.0} ms |",
            nodes, best.0, best.1, best.2
        );
        if n > 2500 {
            let opened = b
                .eval(
                    "const t = performance.now();
                     document.querySelector(\"[data-node='layer:25']\").dispatchEvent(new MouseEvent('click', {bubbles: true}));
                     return [performance.now() - t, document.querySelectorAll('#graph [data-node]').length]",
                )
                .await;
            b.screenshot(&format!("b11-{n}-layer")).await;
            println!(
                "\nOpening one layer of the folded graph (click to redrawn graph, {} nodes then): {:.0} ms\n",
                opened[1],
                opened[0].as_f64().unwrap_or(f64::NAN)
            );
        }
    }

    // Output: a step prints its clock (ms since the epoch) every 100 ms; the page,
    // open on the step, notes when each line arrives. Same machine, same clock.
    let lines = 100;
    let spec = json!({"name": "b11-log", "steps": [{"id": "talk", "tool": "shell",
        "with": {"run": format!("sleep 1; for i in $(seq {lines}); do echo $(date +%s%3N); sleep 0.1; done")}}]})
    .to_string();
    let req = pb::SubmitRunRequest { spec, source: "bench".into(), ..Default::default() };
    let run_id = c.submit_run(req).await?.into_inner().run_id;
    b.goto(&format!("{base}/runs/{run_id}")).await;
    b.click("[data-node='talk']").await;
    b.find("#log").await;
    b.eval(
        "window.__lat = []; const seen = new Set(document.getElementById('log').textContent.split('\\n'));
         new MutationObserver(() => {
           const now = Date.now();
           for (const l of document.getElementById('log').textContent.split('\\n')) {
             if (/^\\d{13}$/.test(l) && !seen.has(l)) { seen.add(l); window.__lat.push(now - Number(l)); }
           }
         }).observe(document.getElementById('log'), {childList: true, subtree: true, characterData: true});
         return true",
    )
    .await;
    b.until("every line to arrive", &format!("return window.__lat.length >= {}", lines - 5)).await;
    let lat: Vec<f64> = serde_json::from_value(b.eval("return window.__lat").await)?;
    let mut sorted = lat.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| sorted[((sorted.len() as f64 - 1.0) * p).round() as usize];
    println!(
        "Output to page: {} lines printed 100 ms apart reached the open page after p50 {:.0} ms, p95 {:.0} ms, max {:.0} ms",
        sorted.len(),
        pct(0.5),
        pct(0.95),
        sorted.last().copied().unwrap_or(f64::NAN)
    );
    b.close().await;
    Ok(())
}
