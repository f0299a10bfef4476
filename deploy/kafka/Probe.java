// Waits until Kafka accepts produce requests: creates a one-partition probe topic if it
// is missing, then produces one record with acks=all and waits for the ack.
// Run by kafka.sh with the broker's own client jars:
//   java -cp 'probe:libs/*' Probe BOOTSTRAP TIMEOUT_SECONDS BROKERS [PID ...]
// BROKERS is how many brokers the cluster has. With more than one, the probe topic has a
// replica on each, and the record is produced only once every broker is registered and
// unfenced and in the topic's ISR: then every broker has just replicated an
// acknowledged record, not merely come up.
// Exits 0 once a record is acknowledged, 1 on timeout or when any PID has exited.

import java.util.List;
import java.util.Properties;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.TimeUnit;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.admin.NewTopic;
import org.apache.kafka.clients.admin.TopicDescription;
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
        int brokers = Integer.parseInt(args[2]);
        String lastError = "no attempt made";
        while (System.nanoTime() < deadline) {
            for (int i = 3; i < args.length; i++) {
                long pid = Long.parseLong(args[i]);
                if (ProcessHandle.of(pid).map(p -> !p.isAlive()).orElse(true)) {
                    System.err.println("probe: Kafka process " + pid + " has exited");
                    System.exit(1);
                }
            }
            try {
                produceOnce(bootstrap, brokers);
                System.exit(0);
            } catch (Exception e) {
                lastError = e.toString();
                Thread.sleep(500);
            }
        }
        System.err.println("probe: broker at " + bootstrap + " did not accept a produce request: " + lastError);
        System.exit(1);
    }

    static void produceOnce(String bootstrap, int brokers) throws Exception {
        Properties common = new Properties();
        common.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        common.put(AdminClientConfig.REQUEST_TIMEOUT_MS_CONFIG, "3000");
        common.put(AdminClientConfig.DEFAULT_API_TIMEOUT_MS_CONFIG, "5000");
        try (Admin admin = Admin.create(common)) {
            try {
                admin.createTopics(List.of(new NewTopic(TOPIC, 1, (short) brokers)))
                    .all().get(5, TimeUnit.SECONDS);
            } catch (ExecutionException e) {
                if (!(e.getCause() instanceof TopicExistsException)) {
                    throw e;
                }
            }
            if (brokers > 1) {
                allBrokersInSync(admin, brokers);
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

    // Throws unless `brokers` brokers are registered and unfenced (only those are
    // described) and all of them are in the probe topic's ISR.
    static void allBrokersInSync(Admin admin, int brokers) throws Exception {
        int alive = admin.describeCluster().nodes().get(5, TimeUnit.SECONDS).size();
        if (alive < brokers) {
            throw new IllegalStateException(alive + " of " + brokers + " brokers are up");
        }
        TopicDescription probe = admin.describeTopics(List.of(TOPIC))
            .allTopicNames().get(5, TimeUnit.SECONDS).get(TOPIC);
        int inSync = probe.partitions().get(0).isr().size();
        if (inSync < brokers) {
            throw new IllegalStateException(inSync + " of " + brokers + " brokers are in sync");
        }
    }
}
