"""Hypothesis strategies for every milter command and reply."""

from __future__ import annotations

from hypothesis import strategies as st

from milter_bridge.protocol import commands as cmd
from milter_bridge.protocol import constants as c
from milter_bridge.protocol import replies as r
from milter_bridge.protocol.constants import ActionFlag, MacroStage, ProtocolFlag

# C string contents: any bytes but NUL (high bytes too: MTAs send non-UTF-8).
cstr = st.binary(max_size=40).map(lambda b: b.replace(b"\0", b"x"))
raw = st.binary(max_size=300)
u32 = st.integers(0, 2**32 - 1)
flags_a = u32.map(ActionFlag)
flags_p = u32.map(ProtocolFlag)

connect = st.one_of(
    st.builds(cmd.Connect, cstr, st.just(c.SMFIA_UNKNOWN)),
    st.builds(
        cmd.Connect,
        cstr,
        st.sampled_from([c.SMFIA_UNIX, c.SMFIA_INET, c.SMFIA_INET6]),
        st.integers(0, 65535),
        cstr,
    ),
)
argv = st.lists(cstr, max_size=4).map(tuple)

commands = st.one_of(
    st.builds(cmd.OptionNegotiation, u32, flags_a, flags_p),
    st.builds(
        cmd.DefineMacro,
        st.sampled_from([b"C", b"H", b"M", b"R", b"T", b"N", b"E", b"L", b"B"]),
        st.lists(st.tuples(cstr, cstr), max_size=5).map(tuple),
    ),
    connect,
    st.builds(cmd.Helo, cstr),
    st.builds(cmd.Mail, cstr, argv),
    st.builds(cmd.Rcpt, cstr, argv),
    st.builds(cmd.Header, cstr, cstr),
    st.builds(cmd.Body, raw),
    st.builds(cmd.EndOfMessage, raw),
    st.builds(cmd.Unknown, cstr),
    *(
        st.builds(k, st.just(b""))
        for k in (cmd.Data, cmd.EndOfHeaders, cmd.Abort, cmd.Quit, cmd.QuitNewConnection)
    ),
)

replies = st.one_of(
    st.builds(
        r.OptionNegotiationReply,
        u32,
        flags_a,
        flags_p,
        st.lists(st.tuples(st.sampled_from(list(MacroStage)), cstr), max_size=3).map(tuple),
    ),
    *(
        st.builds(k)
        for k in (r.Continue, r.Accept, r.Reject, r.TempFail, r.Discard, r.Skip, r.Progress)
    ),
    st.builds(r.ReplyCode, cstr),
    st.builds(r.AddHeader, cstr, cstr),
    st.builds(r.InsertHeader, u32, cstr, cstr),
    st.builds(r.ChangeHeader, u32, cstr, cstr),
    st.builds(r.AddRecipient, cstr),
    st.builds(r.AddRecipientWithArgs, cstr, st.none() | cstr),
    st.builds(r.DeleteRecipient, cstr),
    st.builds(r.ChangeSender, cstr, st.none() | cstr),
    st.builds(r.ReplaceBody, raw),
    st.builds(r.Quarantine, cstr),
)
