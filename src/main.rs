//! The `kvsharer` binary: parses the command line and hands off to `cli`.

mod cli;

fn main() -> std::process::ExitCode {
    match cli::main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            for line in error_lines(&e) {
                eprintln!("{line}");
            }
            if let Some(hint) = cli::hint(&e) {
                eprintln!("  hint: {hint}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}

/// `error: {e}`, then one `caused by:` line per cause, the outermost first, leaving
/// out a cause whose text the line before it already says (many errors print their
/// source inside their own message).
fn error_lines(e: &anyhow::Error) -> Vec<String> {
    let mut lines = vec![format!("error: {e}")];
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if lines.last().is_some_and(|last| last.contains(&text)) {
            continue;
        }
        lines.push(format!("  caused by: {text}"));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::error_lines;

    #[derive(Debug)]
    struct Echo(&'static str, Option<Box<Echo>>);

    impl std::fmt::Display for Echo {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Echo {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    #[test]
    fn causes_already_in_the_line_before_are_left_out() {
        let inner = Echo("is a directory", None);
        let mid = Echo("cannot read x: is a directory", Some(Box::new(inner)));
        let e = anyhow::Error::new(Echo(
            "x: cannot read x: is a directory",
            Some(Box::new(mid)),
        ));
        assert_eq!(error_lines(&e), ["error: x: cannot read x: is a directory"]);

        let e = anyhow::Error::new(Echo("permission denied", None)).context("cannot read x");
        assert_eq!(
            error_lines(&e),
            ["error: cannot read x", "  caused by: permission denied"]
        );
    }
}
