// Waits until a Kafka broker accepts produce requests: creates a one-partition probe
// topic if it is missing, then produces one record with acks=all and waits for the ack.
// Run by kafka.sh as a single-file source program with the broker's own client jars:
//   java -cp 'libs/*' Probe.java BOOTSTRAP TIMEOUT_SECONDS [BROKER_PID]
// Exits 0 once a record is acknowledged, 1 on timeout or when BROKER_PID has exited.

import java.util.List;
import java.util.Properties;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.TimeUnit;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.admin.NewTopic;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.common.errors.TopicExistsException;
import org.apache.kafka.common.serialization.StringSerializer;

public class Probe {
    static final String TOPIC = "__cafe_probe";

    public static void main(String[] args) throws InterruptedException {
        String bootstrap = args[0];
        long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(Long.parseLong(args[1]));
        Long brokerPid = args.length > 2 ? Long.parseLong(args[2]) : null;
        String lastError = "no attempt made";
        while (System.nanoTime() < deadline) {
            if (brokerPid != null && ProcessHandle.of(brokerPid).map(p -> !p.isAlive()).orElse(true)) {
                System.err.println("probe: broker process " + brokerPid + " has exited");
                System.exit(1);
            }
            try {
                produceOnce(bootstrap);
                System.exit(0);
            } catch (Exception e) {
                lastError = e.toString();
                Thread.sleep(500);
            }
        }
        System.err.println("probe: broker at " + bootstrap + " did not accept a produce request: " + lastError);
        System.exit(1);
    }

    static void produceOnce(String bootstrap) throws Exception {
        Properties common = new Properties();
        common.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        common.put(AdminClientConfig.REQUEST_TIMEOUT_MS_CONFIG, "3000");
        common.put(AdminClientConfig.DEFAULT_API_TIMEOUT_MS_CONFIG, "5000");
        try (Admin admin = Admin.create(common)) {
            admin.createTopics(List.of(new NewTopic(TOPIC, 1, (short) 1))).all().get(5, TimeUnit.SECONDS);
        } catch (ExecutionException e) {
            if (!(e.getCause() instanceof TopicExistsException)) {
                throw e;
            }
        }
        Properties producerProps = new Properties();
        producerProps.put(ProducerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        producerProps.put(ProducerConfig.ACKS_CONFIG, "all");
        producerProps.put(ProducerConfig.MAX_BLOCK_MS_CONFIG, "5000");
        producerProps.put(ProducerConfig.DELIVERY_TIMEOUT_MS_CONFIG, "5000");
        producerProps.put(ProducerConfig.REQUEST_TIMEOUT_MS_CONFIG, "3000");
        producerProps.put(ProducerConfig.KEY_SERIALIZER_CLASS_CONFIG, StringSerializer.class.getName());
        producerProps.put(ProducerConfig.VALUE_SERIALIZER_CLASS_CONFIG, StringSerializer.class.getName());
        try (KafkaProducer<String, String> producer = new KafkaProducer<>(producerProps)) {
            producer.send(new ProducerRecord<>(TOPIC, "probe", "ready?")).get(5, TimeUnit.SECONDS);
        }
    }
}
