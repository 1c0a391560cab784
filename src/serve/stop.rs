//! Stop sequences over streamed text: text is released as soon as it can no longer
//! be the start of a stop sequence, and generation ends at the first complete one
//! (which is not sent), as OpenAI's `stop` does.

#[derive(Debug, Default)]
pub struct StopText {
    stops: Vec<String>,
    held: String,
}

impl StopText {
    pub fn new(stops: Vec<String>) -> Self {
        StopText {
            stops,
            held: String::new(),
        }
    }

    /// Adds generated text; returns the text that may be sent now and whether a stop
    /// sequence was completed (then nothing from it on is sent).
    pub fn push(&mut self, text: &str) -> (String, bool) {
        self.held.push_str(text);
        if let Some(at) = self.stops.iter().filter_map(|s| self.held.find(s)).min() {
            let out = self.held[..at].to_string();
            self.held.clear();
            return (out, true);
        }
        let keep = self.partial_suffix();
        let out = self.held[..self.held.len() - keep].to_string();
        self.held.drain(..self.held.len() - keep);
        (out, false)
    }

    /// Whatever is still held back (generation ended without a stop sequence).
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Bytes at the end of the held text that begin some stop sequence.
    fn partial_suffix(&self) -> usize {
        let h = &self.held;
        (1..=h.len())
            .rev()
            .filter(|&n| h.is_char_boundary(h.len() - n))
            .find(|&n| {
                let tail = &h[h.len() - n..];
                self.stops
                    .iter()
                    .any(|s| s.len() > n && s.starts_with(tail))
            })
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_back_partial_stops_and_cuts_at_the_first_complete_one() {
        let mut s = StopText::new(vec!["END".into(), "\n\n".into()]);
        assert_eq!(s.push("hello E"), ("hello ".into(), false));
        assert_eq!(s.push("N"), (String::new(), false));
        assert_eq!(s.push("Dless"), (String::new(), true));
        let mut s = StopText::new(vec!["END".into()]);
        assert_eq!(s.push("aEN"), ("a".into(), false));
        assert_eq!(s.push("x"), ("ENx".into(), false));
        assert_eq!(s.push("é\n"), ("é\n".into(), false));
        assert_eq!(s.flush(), "");
        let mut none = StopText::new(vec![]);
        assert_eq!(none.push("abc"), ("abc".into(), false));
    }
}
