//! Every resource bound of the protocol core, named, documented and defaulted.
//!
//! The runtime shell fills a [`Limits`] from its configuration once and hands a copy to each
//! session; nothing in the core allocates beyond what these values allow.

/// The initial window of every channel in both directions (RFC 3081 §3.1.1, BEEP-60).
pub const INITIAL_WINDOW: u32 = 4096;

/// Largest value of channel, msgno and size fields (RFC 3080 §2.2.1.1, BEEP-02).
pub const MAX_31BIT: u32 = 2_147_483_647;

/// Longest legal data header without leading zeros is 62 octets (RFC 3080 §2.2.1); leave room for
/// peers that pad numbers with zeros.
pub const DEFAULT_MAX_HEADER_LINE: usize = 128;

/// Limits applied by a session to what a peer may make it hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Longest header line (including CRLF) accepted before the frame is declared poorly formed.
    pub max_header_line: usize,
    /// Receive window advertised per channel once the channel exists (octets). The protocol
    /// starts every channel at 4096; a larger value is advertised with the first SEQ.
    pub recv_window: u32,
    /// Largest message assembled from continuation frames (octets). A MSG that grows past it
    /// is answered with a pre-emptive ERR 550 and its remaining frames are ignored (BEEP-38);
    /// an oversized reply closes its channel (or the session on channel 0).
    pub max_message_size: usize,
    /// Largest payload of one frame this side emits. RFC 3081 §3.1.4 suggests 2/3 of the TCP
    /// MSS; a bigger default keeps per-frame overhead low on loopback and LAN links.
    pub max_send_frame: u32,
    /// Most channels (besides channel 0) open at once in a session (BEEP-16 asks for >= 257).
    pub max_channels: usize,
    /// Most MSGs received on one channel still waiting for our reply. A peer that pipelines
    /// further is terminated: it would otherwise make us hold unbounded state.
    pub max_pending_replies: usize,
    /// Most one-to-many answers (ANS with distinct ansnos) a peer may have in progress at once
    /// for one of our MSGs. Answers interleave (BEEP-36), and each partial answer is buffered
    /// up to `max_message_size`; a peer that opens more is terminated.
    pub max_answers_in_progress: usize,
    /// Most of our own MSGs on one channel awaiting a reply before `send_msg` refuses (the
    /// relay then holds further deliveries and pauses its other connections: backpressure).
    pub max_outstanding_msgs: usize,
    /// Most octets of our own MSGs queued on one channel and not yet completely sent before
    /// `send_msg` refuses (the MSG that crosses it is still taken). `max_outstanding_msgs`
    /// counts messages; this bounds what they weigh, so a recipient that stops reading cannot
    /// make the relay hold `max_outstanding_msgs` messages of the largest size.
    pub max_queued_octets: usize,
    /// Most octets of partial messages (continued frames not yet completed) one session may
    /// hold over all its channels. Each channel's window bounds what is in flight, not what
    /// piles up half-assembled: without this a peer that never finishes its messages on many
    /// channels makes the relay buffer `max_message_size` per channel. Must be at least
    /// `max_message_size`, so that one message of the largest size can always complete.
    pub max_session_assembly: usize,
    /// Most octets of our replies waiting to be written (the peer's window for them is
    /// closed) before the session stops handing out the peer's messages, so that their
    /// octets close our own window in turn: a peer that pipelines MSGs but never takes the
    /// replies cannot make us queue replies without bound.
    pub max_queued_replies: usize,
    /// Most octets of the peer's messages that may wait, not handed out, while its replies
    /// are over `max_queued_replies`: past it the session is ended (a peer that takes no
    /// replies and fills the windows of many channels). The windows bound each channel, not
    /// their sum.
    pub max_unanswered_octets: usize,
    /// Largest piggybacked `profile` content in a `start` (RFC 3080 §2.3.1.2: "4K octets").
    pub max_piggyback: usize,
    /// Octets of output `poll_transmit` appends per call; bounds one write.
    pub max_transmit: usize,
    /// Most nested XML elements accepted in a channel-0 document.
    pub max_xml_depth: usize,
    /// Most attributes on one XML element of a channel-0 document.
    pub max_xml_attributes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header_line: DEFAULT_MAX_HEADER_LINE,
            recv_window: 256 * 1024,
            max_message_size: 4 * 1024 * 1024,
            max_send_frame: 32 * 1024,
            max_channels: 1024,
            max_pending_replies: 65_536,
            max_answers_in_progress: 64,
            max_outstanding_msgs: 4096,
            max_queued_octets: 16 * 1024 * 1024,
            max_session_assembly: 8 * 1024 * 1024,
            max_queued_replies: 1024 * 1024,
            max_unanswered_octets: 8 * 1024 * 1024,
            max_piggyback: 4096,
            max_transmit: 256 * 1024,
            max_xml_depth: 16,
            max_xml_attributes: 16,
        }
    }
}

impl Limits {
    /// Checks the values are usable together; returns the name of the first bad field.
    pub fn validate(&self) -> Result<(), &'static str> {
        if self.max_header_line < 64 {
            return Err("max_header_line (must be >= 64)");
        }
        if self.recv_window < INITIAL_WINDOW || self.recv_window > MAX_31BIT {
            return Err("recv_window (must be 4096..=2147483647)");
        }
        if self.max_send_frame == 0 || self.max_send_frame > MAX_31BIT {
            return Err("max_send_frame (must be 1..=2147483647)");
        }
        if self.max_channels == 0 {
            return Err("max_channels (must be >= 1)");
        }
        if self.max_answers_in_progress == 0 {
            return Err("max_answers_in_progress (must be >= 1)");
        }
        if self.max_pending_replies == 0 || self.max_outstanding_msgs == 0 {
            return Err("max_pending_replies/max_outstanding_msgs (must be >= 1)");
        }
        if self.max_session_assembly < self.max_message_size {
            return Err("max_session_assembly (must be >= max_message_size)");
        }
        if self.max_queued_replies == 0 {
            return Err("max_queued_replies (must be >= 1)");
        }
        if self.max_queued_octets == 0 {
            return Err("max_queued_octets (must be >= 1)");
        }
        if self.max_outstanding_msgs > 1 << 30 {
            return Err("max_outstanding_msgs (must be <= 2^30, far below the msgno range)");
        }
        if self.max_transmit < 1024 {
            return Err("max_transmit (must be >= 1024)");
        }
        if self.max_xml_depth < 2 || self.max_xml_attributes < 4 {
            return Err("max_xml_depth/max_xml_attributes (must be >= 2 and >= 4)");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_meet_beep_16() {
        let limits = Limits::default();
        assert_eq!(limits.validate(), Ok(()));
        assert!(limits.max_channels >= 257, "BEEP-16");
        assert!(limits.max_piggyback >= 4096, "BEEP-21");
    }

    #[test]
    fn validate_names_the_bad_field() {
        let limits = Limits {
            recv_window: 100,
            ..Limits::default()
        };
        assert!(limits.validate().unwrap_err().starts_with("recv_window"));
        // One message of the largest size must always be able to complete.
        let limits = Limits {
            max_session_assembly: Limits::default().max_message_size - 1,
            ..Limits::default()
        };
        assert!(limits
            .validate()
            .unwrap_err()
            .starts_with("max_session_assembly"));
    }
}
