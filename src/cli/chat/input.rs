//! What the user types at the chat prompt: continued lines, slash commands, and the
//! rustyline helper that keeps reading while a line ends in a backslash.

use std::path::PathBuf;

use rustyline::completion::Completer;
use rustyline::highlight::Highlighter;
use rustyline::hint::Hinter;
use rustyline::validate::{ValidationContext, ValidationResult, Validator};
use rustyline::{Cmd, ConditionalEventHandler, Event, EventContext, Helper, Movement, RepeatCount};

/// One thing typed at the prompt, after continuation lines were joined.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    /// Nothing but whitespace.
    Empty,
    /// Text for the model.
    Message(String),
    Command(SlashCommand),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SlashCommand {
    Help,
    /// Forget the conversation, keep the system prompt.
    Reset,
    /// Show the system prompt in use.
    ShowSystem,
    /// Replace the system prompt.
    SetSystem(String),
    Stats,
    Save(PathBuf),
    Quit,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    #[error("unknown command /{0} (type /help for the list; start a message with // to send a literal /)")]
    Unknown(String),
    #[error("/{command} needs an argument: {usage}")]
    MissingArgument {
        command: &'static str,
        usage: &'static str,
    },
    #[error("/{0} takes no argument")]
    UnexpectedArgument(&'static str),
}

pub const HELP: &str = "\
Commands:
  /help           this list
  /reset          forget the conversation (the system prompt stays)
  /system TEXT    replace the system prompt (alone: show it)
  /stats          context use, speed of the last reply, KV cache memory and sharing
  /save FILE      write the conversation and settings to FILE as JSON
  /quit           leave (also /exit, Ctrl-D, or Ctrl-C at an empty prompt)
Input:
  End a line with \\ to continue on the next one; pasted multi-line text is sent whole.
  Start a message with // to send text that begins with /.
  Ctrl-C while the model answers stops the answer and keeps the conversation.";

/// Whether the input typed so far asks for another line: its last line ends in an
/// unescaped backslash.
pub fn wants_continuation(text: &str) -> bool {
    let trailing = text.bytes().rev().take_while(|&b| b == b'\\').count();
    trailing % 2 == 1
}

/// Removes the continuation backslashes from multi-line input: a line ending in an
/// odd number of `\` loses the last one and joins the next with a newline. Other
/// lines (pasted text, an even run of backslashes) stay as they are.
pub fn join_continued_lines(raw: &str) -> String {
    let lines: Vec<&str> = raw.split('\n').collect();
    let last = lines.len() - 1;
    let mut out = String::with_capacity(raw.len());
    for (i, line) in lines.iter().enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if wants_continuation(line) {
            out.push_str(&line[..line.len() - 1]);
        } else {
            out.push_str(line);
        }
        if i != last {
            out.push('\n');
        }
    }
    out
}

/// Turns one complete (joined) input into a message or a command.
pub fn parse_input(text: &str) -> Result<Input, InputError> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Ok(Input::Empty);
    }
    if let Some(literal) = trimmed.strip_prefix("//") {
        return Ok(Input::Message(format!("/{literal}")));
    }
    let Some(command_line) = trimmed.strip_prefix('/') else {
        return Ok(Input::Message(trimmed.to_owned()));
    };
    let (name, arg) = match command_line.find(char::is_whitespace) {
        Some(at) => (&command_line[..at], command_line[at..].trim()),
        None => (command_line, ""),
    };
    let no_arg = |command: SlashCommand, name: &'static str| {
        if arg.is_empty() {
            Ok(Input::Command(command))
        } else {
            Err(InputError::UnexpectedArgument(name))
        }
    };
    match name {
        "help" | "?" => no_arg(SlashCommand::Help, "help"),
        "reset" => no_arg(SlashCommand::Reset, "reset"),
        "stats" => no_arg(SlashCommand::Stats, "stats"),
        "quit" => no_arg(SlashCommand::Quit, "quit"),
        "exit" => no_arg(SlashCommand::Quit, "exit"),
        "system" if arg.is_empty() => Ok(Input::Command(SlashCommand::ShowSystem)),
        "system" => Ok(Input::Command(SlashCommand::SetSystem(arg.to_owned()))),
        "save" if arg.is_empty() => Err(InputError::MissingArgument {
            command: "save",
            usage: "/save FILE",
        }),
        "save" => Ok(Input::Command(SlashCommand::Save(PathBuf::from(arg)))),
        other => Err(InputError::Unknown(other.to_owned())),
    }
}

/// The rustyline helper: only validation is customised (continuation lines).
pub struct ChatHelper;

impl Validator for ChatHelper {
    fn validate(&self, ctx: &mut ValidationContext<'_>) -> rustyline::Result<ValidationResult> {
        if wants_continuation(ctx.input()) {
            Ok(ValidationResult::Incomplete)
        } else {
            Ok(ValidationResult::Valid(None))
        }
    }
}

impl Completer for ChatHelper {
    type Candidate = String;
}

impl Hinter for ChatHelper {
    type Hint = String;
}

impl Highlighter for ChatHelper {}

impl Helper for ChatHelper {}

/// Ctrl-C with text at the prompt clears that text, as shells do; only at an empty
/// prompt does it reach the REPL as an interrupt (which ends the chat).
pub struct ClearLineOnInterrupt;

impl ConditionalEventHandler for ClearLineOnInterrupt {
    fn handle(
        &self,
        _evt: &Event,
        _n: RepeatCount,
        _positive: bool,
        ctx: &EventContext<'_>,
    ) -> Option<Cmd> {
        if ctx.line().is_empty() {
            None
        } else {
            Some(Cmd::Kill(Movement::WholeBuffer))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continuation_needs_an_odd_number_of_trailing_backslashes() {
        assert!(wants_continuation("hello \\"));
        assert!(!wants_continuation("hello \\\\"));
        assert!(wants_continuation("a\\\\\\"));
        assert!(!wants_continuation("hello"));
        assert!(!wants_continuation(""));
        assert!(wants_continuation("first\\\nsecond\\"));
        assert!(!wants_continuation("first\\\nsecond"));
    }

    #[test]
    fn joins_backslash_continued_lines_with_newlines() {
        assert_eq!(
            join_continued_lines("one\\\ntwo\\\nthree"),
            "one\ntwo\nthree"
        );
        assert_eq!(join_continued_lines("single line"), "single line");
        assert_eq!(join_continued_lines("trailing\\"), "trailing");
    }

    #[test]
    fn pasted_lines_and_literal_backslashes_survive_joining() {
        assert_eq!(
            join_continued_lines("pasted\nlines\nhere"),
            "pasted\nlines\nhere"
        );
        assert_eq!(
            join_continued_lines("path C:\\\\\nnext"),
            "path C:\\\\\nnext"
        );
        assert_eq!(join_continued_lines("a \\ b\nc"), "a \\ b\nc");
        assert_eq!(join_continued_lines("crlf\\\r\nnext\r"), "crlf\nnext");
    }

    #[test]
    fn plain_text_is_a_trimmed_message() {
        assert_eq!(
            parse_input("  hi there \n").unwrap(),
            Input::Message("hi there".into())
        );
        assert_eq!(parse_input(" \n\t").unwrap(), Input::Empty);
        assert_eq!(
            parse_input("line one\nline two").unwrap(),
            Input::Message("line one\nline two".into())
        );
    }

    #[test]
    fn double_slash_sends_a_literal_slash() {
        assert_eq!(
            parse_input("//etc/passwd?").unwrap(),
            Input::Message("/etc/passwd?".into())
        );
    }

    #[test]
    fn slash_commands_parse_with_their_arguments() {
        assert_eq!(
            parse_input("/help").unwrap(),
            Input::Command(SlashCommand::Help)
        );
        assert_eq!(
            parse_input("/?").unwrap(),
            Input::Command(SlashCommand::Help)
        );
        assert_eq!(
            parse_input("/reset").unwrap(),
            Input::Command(SlashCommand::Reset)
        );
        assert_eq!(
            parse_input(" /stats ").unwrap(),
            Input::Command(SlashCommand::Stats)
        );
        assert_eq!(
            parse_input("/quit").unwrap(),
            Input::Command(SlashCommand::Quit)
        );
        assert_eq!(
            parse_input("/exit").unwrap(),
            Input::Command(SlashCommand::Quit)
        );
        assert_eq!(
            parse_input("/system").unwrap(),
            Input::Command(SlashCommand::ShowSystem)
        );
        assert_eq!(
            parse_input("/system   You are terse.\nAnswer in French.").unwrap(),
            Input::Command(SlashCommand::SetSystem(
                "You are terse.\nAnswer in French.".into()
            ))
        );
        assert_eq!(
            parse_input("/save out dir/chat.json").unwrap(),
            Input::Command(SlashCommand::Save(PathBuf::from("out dir/chat.json")))
        );
    }

    #[test]
    fn bad_slash_commands_are_errors_naming_the_command() {
        assert_eq!(
            parse_input("/frobnicate now"),
            Err(InputError::Unknown("frobnicate".into()))
        );
        assert_eq!(
            parse_input("/save"),
            Err(InputError::MissingArgument {
                command: "save",
                usage: "/save FILE"
            })
        );
        assert_eq!(
            parse_input("/stats please"),
            Err(InputError::UnexpectedArgument("stats"))
        );
        assert_eq!(parse_input("/"), Err(InputError::Unknown(String::new())));
        let msg = parse_input("/frobnicate").unwrap_err().to_string();
        assert!(
            msg.contains("/frobnicate") && msg.contains("/help"),
            "{msg}"
        );
    }
}
