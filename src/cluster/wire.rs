//! What travels on a link between two nodes: a batch of frames for a worker of a stage, and the
//! worker's answer.
//!
//! Every message is one gRPC message (so HTTP/2 frames it and flow-controls it) holding a small
//! JSON header and then the raw bytes it describes:
//!
//! ```text
//! u32 header length (big endian) | header (JSON) | bytes of frame 0 | bytes of frame 1 | ...
//! ```
//!
//! A batch's header names the stage and worker and, per frame, its stream, sequence number,
//! capture time, deadline, route, the results earlier stages attached, and what its bytes are:
//! an activation (shape and dtype, little-endian `f32`), the image (size and pixel format), or
//! filler standing for the activation of an emulated cut (as many bytes as the cut has, so the
//! network carries what a real cut would). The answer's header says whether the batch ran, and
//! per frame the results the stage attached and the activation it passes on.

use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

use crate::clock::Nanos;
use crate::frame::{Frame, Image, PixelFormat, StageOutput};

/// One message: a JSON header and the bytes it describes.
#[derive(Debug, Clone, Default)]
pub struct Packet {
    /// The header, JSON.
    pub header: Bytes,
    /// The bytes of every frame, one after the other.
    pub body: Bytes,
}

/// The codec of [`Packet`]s: the length of the header, the header, the body.
#[derive(Debug, Clone, Copy, Default)]
pub struct PacketCodec;

impl Codec for PacketCodec {
    type Encode = Packet;
    type Decode = Packet;
    type Encoder = PacketCodec;
    type Decoder = PacketCodec;

    fn encoder(&mut self) -> Self::Encoder {
        *self
    }

    fn decoder(&mut self) -> Self::Decoder {
        *self
    }
}

impl Encoder for PacketCodec {
    type Item = Packet;
    type Error = Status;

    fn encode(&mut self, item: Packet, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        let len = u32::try_from(item.header.len())
            .map_err(|_| Status::invalid_argument("header over 4 GiB"))?;
        dst.reserve(4 + item.header.len() + item.body.len());
        dst.put_u32(len);
        dst.put_slice(&item.header);
        dst.put_slice(&item.body);
        Ok(())
    }
}

impl Decoder for PacketCodec {
    type Item = Packet;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Packet>, Status> {
        if src.remaining() < 4 {
            return Err(Status::invalid_argument(
                "message shorter than its header length",
            ));
        }
        let len = src.get_u32() as usize;
        if src.remaining() < len {
            return Err(Status::invalid_argument(format!(
                "header of {len} bytes in a message of {}",
                src.remaining()
            )));
        }
        let header = src.copy_to_bytes(len);
        let body = src.copy_to_bytes(src.remaining());
        Ok(Some(Packet { header, body }))
    }
}

/// Element type of a tensor on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    /// 32-bit float, little endian.
    F32,
}

/// What a frame's bytes are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Payload {
    /// Nothing.
    None,
    /// An activation.
    Tensor {
        /// Shape of one frame's activation (no batch dimension).
        shape: Vec<usize>,
        /// Element type.
        dtype: Dtype,
    },
    /// The frame's image.
    Image {
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
        /// Channel order.
        format: PixelFormat,
    },
    /// Bytes that stand for an emulated cut's activation.
    Filler {
        /// How many.
        bytes: u64,
    },
}

impl Payload {
    /// Bytes of the payload in the body.
    pub fn bytes(&self) -> usize {
        match self {
            Payload::None => 0,
            Payload::Tensor { shape, .. } => shape.iter().product::<usize>() * 4,
            Payload::Image { width, height, .. } => *width as usize * *height as usize * 3,
            Payload::Filler { bytes } => *bytes as usize,
        }
    }
}

/// One frame of a batch.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FrameHeader {
    /// Stream index.
    pub stream: usize,
    /// Sequence number within the stream.
    pub seq: u64,
    /// Capture time on the front node's clock, ns.
    pub captured: Nanos,
    /// Deadline on the front node's clock, ns.
    pub deadline: Nanos,
    /// The route it takes (its reservations stay on the front node).
    pub route: usize,
    /// What earlier stages attached (later stages may read them, e.g. boxes to crop).
    pub outputs: Vec<StageOutput>,
    /// Its bytes.
    pub payload: Payload,
}

/// A batch for a worker of a stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BatchHeader {
    /// Stage name.
    pub stage: String,
    /// Worker of the stage's pool.
    pub worker: usize,
    /// The front that sent it (its id in the front lease), where fronts hold one: a node takes
    /// batches only from the holder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub front: Option<String>,
    /// The frames.
    pub frames: Vec<FrameHeader>,
}

/// One frame of an answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DoneFrame {
    /// Results the stage attached.
    pub outputs: Vec<StageOutput>,
    /// The activation it passes on, if any.
    pub payload: Payload,
}

/// A worker's answer to a batch.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DoneHeader {
    /// Why the batch did not run (the engine's error), if it did not.
    pub error: Option<String>,
    /// Time the node held the batch since it received it (waiting for the batch before it,
    /// running it, and holding it as its device would), ns: the rest of the round trip is the
    /// link's.
    #[serde(default)]
    pub ran_ns: Nanos,
    /// The frames, in batch order (empty on error).
    pub frames: Vec<DoneFrame>,
}

/// A message that does not say what it should.
#[derive(Debug, thiserror::Error)]
#[error("malformed message: {0}")]
pub struct WireError(pub String);

fn header_bytes<T: Serialize>(h: &T) -> Bytes {
    Bytes::from(serde_json::to_vec(h).expect("headers serialise"))
}

fn put_tensor(body: &mut BytesMut, a: &ndarray::ArrayD<f32>) -> Payload {
    match a.as_slice() {
        Some(s) => s.iter().for_each(|x| body.put_f32_le(*x)),
        None => a.iter().for_each(|x| body.put_f32_le(*x)),
    }
    Payload::Tensor {
        shape: a.shape().to_vec(),
        dtype: Dtype::F32,
    }
}

fn take_tensor(body: &mut Bytes, shape: &[usize]) -> Result<ndarray::ArrayD<f32>, WireError> {
    let n: usize = shape.iter().product();
    if body.remaining() < n * 4 {
        return Err(WireError(format!(
            "tensor {shape:?} needs {} bytes, {} left",
            n * 4,
            body.remaining()
        )));
    }
    let v: Vec<f32> = (0..n).map(|_| body.get_f32_le()).collect();
    ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(shape), v).map_err(|e| WireError(e.to_string()))
}

/// What a frame sends: its activation where it has one, else its image where the stage takes
/// images, else `filler` bytes (an emulated cut).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sends {
    /// The activation (or nothing where the frame has none).
    Activation,
    /// The image.
    Image,
    /// This many bytes per frame standing for an emulated activation.
    Filler(u64),
}

/// Encodes a batch of `frames` for worker `worker` of stage `stage`.
pub fn encode_batch(
    (stage, worker): (&str, usize),
    front: Option<&str>,
    frames: &[Frame],
    sends: Sends,
) -> Packet {
    let mut body = BytesMut::new();
    let headers = frames
        .iter()
        .map(|f| {
            let payload = match (&f.activation, sends) {
                (Some(a), _) => put_tensor(&mut body, a),
                (None, Sends::Image) => {
                    body.put_slice(f.image.bytes());
                    Payload::Image {
                        width: f.image.width,
                        height: f.image.height,
                        format: f.image.format,
                    }
                }
                (None, Sends::Filler(n)) if n > 0 => {
                    body.put_bytes(0, n as usize);
                    Payload::Filler { bytes: n }
                }
                _ => Payload::None,
            };
            FrameHeader {
                stream: f.stream,
                seq: f.seq,
                captured: f.captured,
                deadline: f.deadline,
                route: f.route,
                outputs: f.outputs.clone(),
                payload,
            }
        })
        .collect();
    Packet {
        header: header_bytes(&BatchHeader {
            stage: stage.to_string(),
            worker,
            front: front.map(String::from),
            frames: headers,
        }),
        body: body.freeze(),
    }
}

/// Decodes a batch into its header and frames (an image-less frame gets an empty image).
pub fn decode_batch(p: Packet) -> Result<(BatchHeader, Vec<Frame>), WireError> {
    let mut h: BatchHeader =
        serde_json::from_slice(&p.header).map_err(|e| WireError(e.to_string()))?;
    let mut body = p.body;
    let empty = Arc::new(Image::black(0, 0, PixelFormat::RGB));
    let mut frames = Vec::with_capacity(h.frames.len());
    for fh in &mut h.frames {
        let mut f = Frame::new(fh.stream, fh.seq, empty.clone(), fh.captured, fh.deadline);
        f.route = fh.route;
        f.outputs = std::mem::take(&mut fh.outputs);
        let need = fh.payload.bytes();
        if body.remaining() < need {
            return Err(WireError(format!(
                "frame {}/{} needs {need} bytes, {} left",
                fh.stream,
                fh.seq,
                body.remaining()
            )));
        }
        match &fh.payload {
            Payload::Tensor { shape, .. } => f.activation = Some(take_tensor(&mut body, shape)?),
            Payload::Image {
                width,
                height,
                format,
            } => {
                let data = body.copy_to_bytes(need).to_vec();
                f.image = Arc::new(Image::from_vec(*width, *height, *format, data));
            }
            Payload::Filler { .. } => body.advance(need),
            Payload::None => {}
        }
        frames.push(f);
    }
    Ok((h, frames))
}

/// Encodes a worker's answer: the results each frame gained after its first `before[i]`, and
/// its activation.
pub fn encode_done(
    frames: &mut [Frame],
    before: &[usize],
    error: Option<String>,
    ran_ns: Nanos,
) -> Packet {
    let mut body = BytesMut::new();
    let done = match error {
        Some(e) => DoneHeader {
            error: Some(e),
            ran_ns,
            frames: Vec::new(),
        },
        None => DoneHeader {
            error: None,
            ran_ns,
            frames: frames
                .iter_mut()
                .zip(before)
                .map(|(f, &n)| DoneFrame {
                    outputs: f.outputs.split_off(n.min(f.outputs.len())),
                    payload: match &f.activation {
                        Some(a) => put_tensor(&mut body, a),
                        None => Payload::None,
                    },
                })
                .collect(),
        },
    };
    Packet {
        header: header_bytes(&done),
        body: body.freeze(),
    }
}

/// Applies a worker's answer to the frames it ran: their new results and activations. Returns
/// the node's time on the batch, or the engine's error if the batch did not run.
pub fn apply_done(p: Packet, frames: &mut [Frame]) -> Result<Result<Nanos, String>, WireError> {
    let h: DoneHeader = serde_json::from_slice(&p.header).map_err(|e| WireError(e.to_string()))?;
    if let Some(e) = h.error {
        return Ok(Err(e));
    }
    if h.frames.len() != frames.len() {
        return Err(WireError(format!(
            "{} frames answered for a batch of {}",
            h.frames.len(),
            frames.len()
        )));
    }
    let mut body = p.body;
    for (f, d) in frames.iter_mut().zip(h.frames) {
        f.outputs.extend(d.outputs);
        f.activation = match &d.payload {
            Payload::Tensor { shape, .. } => Some(take_tensor(&mut body, shape)?),
            _ => None,
        };
    }
    Ok(Ok(h.ran_ns))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{Class, EmulatedRun};

    fn frame(stream: usize, seq: u64) -> Frame {
        let img = Arc::new(Image::from_vec(
            2,
            1,
            PixelFormat::BGR,
            vec![1, 2, 3, 4, 5, 6],
        ));
        let mut f = Frame::new(stream, seq, img, 100 + seq, 200 + seq);
        f.route = 3;
        f
    }

    fn roundtrip(p: Packet) -> Packet {
        let mut buf = BytesMut::new();
        let (h, b) = (p.header.clone(), p.body.clone());
        buf.put_u32(h.len() as u32);
        buf.put_slice(&h);
        buf.put_slice(&b);
        let mut bytes = buf.freeze();
        let len = bytes.get_u32() as usize;
        let header = bytes.split_to(len);
        Packet {
            header,
            body: bytes,
        }
    }

    #[test]
    fn a_batch_of_activations_arrives_as_it_was_sent() {
        let mut a = frame(0, 7);
        a.activation = Some(
            ndarray::ArrayD::from_shape_vec(
                ndarray::IxDyn(&[2, 3]),
                vec![0.5, -1.0, 2.0, 3.5, 4.0, -0.25],
            )
            .unwrap(),
        );
        a.outputs.push(StageOutput::Nothing);
        let mut b = frame(1, 8);
        // A non-contiguous activation is sent in logical order.
        b.activation = Some(
            ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[2, 2]), vec![1.0, 2.0, 3.0, 4.0])
                .unwrap()
                .reversed_axes(),
        );
        let p = encode_batch(
            ("s1", 2),
            Some("front@h:1"),
            &[a.clone(), b.clone()],
            Sends::Activation,
        );
        let (h, got) = decode_batch(roundtrip(p)).unwrap();
        assert_eq!((h.stage.as_str(), h.worker), ("s1", 2));
        assert_eq!(h.front.as_deref(), Some("front@h:1"));
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].activation, a.activation);
        assert_eq!(
            got[1].activation.as_ref().unwrap().as_slice().unwrap(),
            &[1.0, 3.0, 2.0, 4.0]
        );
        assert_eq!(
            (got[0].stream, got[0].seq, got[0].captured, got[0].deadline),
            (0, 7, 107, 207)
        );
        assert_eq!(got[1].route, 3);
        assert_eq!(got[0].outputs, vec![StageOutput::Nothing]);
    }

    #[test]
    fn images_and_filler_take_their_bytes() {
        let f = frame(0, 1);
        let p = encode_batch(("s", 0), None, std::slice::from_ref(&f), Sends::Image);
        assert_eq!(p.body.len(), 6);
        let (_, got) = decode_batch(p).unwrap();
        assert_eq!(got[0].image.bytes(), f.image.bytes());
        assert_eq!(got[0].image.format, PixelFormat::BGR);
        let p = encode_batch(("s", 0), None, &[f.clone(), f], Sends::Filler(1000));
        assert_eq!(p.body.len(), 2000);
        let (h, got) = decode_batch(p).unwrap();
        assert_eq!(h.frames[1].payload, Payload::Filler { bytes: 1000 });
        assert_eq!(got[1].image.width, 0);
    }

    #[test]
    fn a_short_body_is_an_error_not_a_panic() {
        let f = frame(0, 1);
        let mut p = encode_batch(("s", 0), None, &[f], Sends::Filler(10));
        p.body = p.body.slice(..5);
        assert!(decode_batch(p).unwrap_err().0.contains("needs 10 bytes"));
    }

    #[test]
    fn answers_carry_only_what_the_stage_added() {
        let mut frames = vec![frame(0, 1), frame(0, 2)];
        frames[0].outputs.push(StageOutput::Nothing);
        let before: Vec<usize> = frames.iter().map(|f| f.outputs.len()).collect();
        let class = StageOutput::Classes(vec![Class {
            id: 3,
            label: "cat".into(),
            score: 0.5,
        }]);
        for f in &mut frames {
            f.outputs.push(class.clone());
        }
        frames[1].activation = Some(ndarray::ArrayD::from_elem(ndarray::IxDyn(&[4]), 1.5));
        let p = encode_done(&mut frames, &before, None, 1234);
        let mut front = vec![frame(0, 1), frame(0, 2)];
        front[0].outputs.push(StageOutput::Nothing);
        front[0].activation = Some(ndarray::ArrayD::from_elem(ndarray::IxDyn(&[1]), 0.0));
        assert_eq!(apply_done(p, &mut front).unwrap().unwrap(), 1234);
        assert_eq!(front[0].outputs, vec![StageOutput::Nothing, class.clone()]);
        assert_eq!(front[1].outputs, vec![class]);
        assert_eq!(front[0].activation, None);
        assert_eq!(front[1].activation.as_ref().unwrap().len(), 4);
        let emulated = StageOutput::Emulated(EmulatedRun {
            class: "T4".into(),
            blocks: [5, 10],
            batch: 2,
            latency_ms: 1.5,
            transfer_ms: 0.0,
        });
        let json = serde_json::to_vec(&emulated).unwrap();
        assert_eq!(
            serde_json::from_slice::<StageOutput>(&json).unwrap(),
            emulated
        );
        let err = encode_done(&mut [], &[], Some("boom".into()), 0);
        assert_eq!(apply_done(err, &mut []).unwrap(), Err("boom".into()));
    }
}
