//! How text output looks on this terminal: colour for states (`--color`, `NO_COLOR`,
//! `TERM=dumb`) and lines cut to the terminal's width. Output to a pipe or a file is
//! never coloured (unless `--color always`) nor cut.

use std::io::IsTerminal;
use std::sync::OnceLock;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ColorChoice {
    /// Colour when stdout is a terminal, NO_COLOR is unset and TERM is not dumb.
    Auto,
    Always,
    Never,
}

struct Style {
    color: bool,
    width: Option<usize>,
    dumb: bool,
}

static STYLE: OnceLock<Style> = OnceLock::new();

/// Decides, once, from the flag and the environment.
pub fn init(choice: ColorChoice) {
    let dumb = std::env::var("TERM").is_ok_and(|t| t == "dumb");
    let tty = std::io::stdout().is_terminal();
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    let color = match choice {
        ColorChoice::Always => true,
        ColorChoice::Never => false,
        ColorChoice::Auto => tty && !no_color && !dumb,
    };
    let width = tty.then(|| console::Term::stdout().size_checked().map(|(_, w)| w as usize)).flatten();
    let _ = STYLE.set(Style { color, width, dumb });
}

fn style() -> &'static Style {
    STYLE.get_or_init(|| Style { color: false, width: None, dumb: false })
}

/// Whether a live progress display may redraw lines (not on `TERM=dumb`).
pub fn live() -> bool {
    !style().dumb && std::io::stderr().is_terminal()
}

/// The ANSI colour of a state's name: green done (or reused), red failed, yellow waiting for
/// someone, blue at work, dim not run.
fn code(state: &str) -> Option<&'static str> {
    Some(match state {
        "succeeded" | "reused" => "32",
        "failed" | "timed_out" | "lost" => "31",
        "quarantined" | "retry_wait" | "awaiting_approval" => "33",
        "running" | "assigned" => "34",
        "skipped" | "canceled" => "2",
        _ => return None,
    })
}

/// `state`, coloured when colour is on.
pub fn state(state: &str) -> String {
    match code(state) {
        Some(c) if style().color => format!("\x1b[{c}m{state}\x1b[0m"),
        _ => state.to_string(),
    }
}

/// A line cut to the terminal's width (with `…`), when stdout is a terminal.
pub fn fit(line: &str) -> String {
    match style().width {
        Some(w) if w > 1 && line.chars().count() > w => {
            let cut: String = line.chars().take(w - 1).collect();
            format!("{cut}…")
        }
        _ => line.to_string(),
    }
}

/// A plain line cut to width, with its `[state]` tokens coloured.
pub fn event_line(line: &str, states: &[&str]) -> String {
    let mut out = fit(line);
    if style().color {
        for s in states {
            let token = format!("[{s}]");
            out = out.replace(&token, &format!("[{}]", state(s)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_have_colours_and_others_none() {
        assert_eq!(code("succeeded"), Some("32"));
        assert_eq!(code("failed"), Some("31"));
        assert_eq!(code("waiting"), None);
    }
}
